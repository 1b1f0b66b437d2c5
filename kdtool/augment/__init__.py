"""JDA (Joint Data Augmentation): the authors' op chains, made in the paper's order, batched on tensors.

A view is made as in the authors' code (liwei-group/CCD, ``data/datasets.py``,
``PolicyDatasetC100.__getitem__``): the policy's op chain runs on the whole, uncropped image,
then the dataset's own random transform (CIFAR / digits: a random crop with zero padding and,
where the dataset flips, a horizontal flip; ImageFolder: RandomResizedCrop + flip) is drawn
independently for the original and for each view. At p = 0 the views are independent crops of
the image, never copies. Every draw (crop offsets, flips, which op fires, its sign) is a pure
function of (seed, epoch, index, view), so a run stopped mid-epoch resumes to the same views.

Where a dataset's images share one size (digits, CIFAR-100) the loader hands over the uncropped
uint8 images with one random key per sample, and :class:`TrainViews` makes the chain, the crops
and the flips on the batch, on the accelerator's device. Where sizes differ (ImageFolder) the
loader workers only read and decode, and hand over the images packed one after the other with
their sizes and keys; :func:`differing_size_views` puts them on a padded canvas (each image in
its row's top-left corner, ``extent.py`` runs every op on each image's own pixels), then draws
RandomResizedCrop + flip per view and resamples each crop with Pillow's arithmetic
(``resample.py``). ``augment.jda.device: loader`` (the default on a machine without CUDA) makes
the same pixels in the workers instead, one image at a time (:class:`LoaderViews`).

Each op of a chain fires independently per sample with probability ``p`` at a fixed magnitude
(the authors' grid value); ops with a direction (contrast, brightness, sharpness, colour, shear,
translate) draw a random sign per sample, so the factor is ``1 ± m``. Geometric ops fill with
grey 128; rotate turns one way (the later flip makes it ±θ, as in the authors' code).

The ops follow Pillow's uint8 algorithms (``ImageOps``, ``ImageEnhance``, ``Image.transform``)
on uint8 batches ``(N, C, H, W)`` (C = 3 or 1), on whatever device they live on, without
per-image Python loops: Pillow's integer/float32/float64 arithmetic, rounding and truncation,
mostly as exact integer maths or lookups in tables computed with that arithmetic. Each op runs
only on the rows where it fires; a row on which nothing fires comes back unchanged. On the CPU
the touched rows go through the chain in blocks of a few MiB so that the temporaries stay in the
caches; on other devices the whole batch is one block (no per-sample host synchronisation).

Batch layout of :class:`TrainViews` and :func:`joint_batch` (what the trainer, teacher and loss
rely on)::

    rows [0, B)                  the B originals
    rows [B + v*B, B + (v+1)*B)  augmented view v+1 of originals 0..B-1 (v = 0..V-1)

i.e. ``(B * (1 + V), C, H, W)``; augmented sample ``v*B + i`` is view ``v+1`` of original ``i``
and uses row ``v*B + i`` of the :class:`JDAParams` (view-major).

Modules: ``ops`` (the ops on images of one size), ``extent`` (the same ops on a canvas of images
of differing sizes), ``chain`` (policies, draws, :class:`JointAugment`), ``resample``
(RandomResizedCrop draws and Pillow's resampling, batched), ``views`` (what the trainer gets).
"""

from kdtool.augment.chain import (
    POLICIES, JDAParams, JointAugment, Op, Policy, build_jda, crop_flip, joint_batch, key_uniforms,
)
from kdtool.augment.views import (
    VIEW_DEVICES, LoaderViews, TrainViews, build_train_views, differing_size_views, step_generator, view_device,
)

__all__ = [
    "Op", "Policy", "POLICIES", "JDAParams", "JointAugment", "LoaderViews", "TrainViews", "build_jda",
    "build_train_views", "crop_flip", "joint_batch", "key_uniforms", "step_generator", "VIEW_DEVICES",
    "differing_size_views", "view_device",
]

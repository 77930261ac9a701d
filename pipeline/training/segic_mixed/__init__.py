"""SegIC's mixed-dataset training data: the ``segic_mixed`` sampler of the training loop.

What SegIC trains on (SegIC paper, sec. 4.1 and supplementary A; the authors' ``train.py``,
``utils/dataset.py``, ``utils/fss.py``, ``utils/fss_inst.py`` and ``model/segic.py``; the facts and
our deviations are in docs/segic_training.md):

* per sample, a dataset is drawn with the mix's weights (uniform by default: the authors'
  ``CustomConcatDataset`` with ``random.choices(weights=dataset_ratio)``), a fixed number of samples
  per epoch over the whole mix (``--samples_per_epoch``: 160k main, 80k ablations);
* semantic data (COCO semantic, ADE20k, FSS-1000): one class of the target image (COCO: class
  first, then an image of it, as the authors' ``DatasetCOCO``; ADE20k: image first, then one of its
  classes, as their ``SemADE``; FSS-1000: an image of the split, then its folder's class, as their
  ``DatasetFSS``); the reference is ANOTHER image of that class; one instruction;
* instance data (COCO instances, LVIS): the reference is a second augmentation of the same image;
  ``randint(0, 19)`` (at least one, at most 10) of the instances present in both views are the
  instructions, each with its own instance as target, so the image's other instances are
  background for it;
* augmentation from the feature cache (docs/segic_cache.md): each side of a sample is the plain
  image or one of the ``V`` seeded cached views of it (two DISTINCT variants for instance data),
  optionally flipped in feature space, or (``warp_prob``) a fresh view of the kind's augmentation
  served by warping the nearest cached view, whose missing cells are ignore (255) in the target;
* fold-fair COCO: the COCO sources only use the fold's base classes (``novel_policy`` applies:
  novel pixels are background, or images with novel classes are dropped); with ``novel_by_name`` the
  novel classes (matched by name / synonyms) are kept out of the other sources too;
* negatives: semantic targets list the classes ABSENT from them (the source's usable classes minus
  those in the image; none for FSS-1000, which labels only its folder's class: the authors'
  ``DatasetFSS`` gives no negative class names either); the model draws queued instance features of
  those classes (:meth:`refseg_models.modeling.segic.SegIC.queue_negatives`); semantic instructions
  carry their class key so :meth:`~refseg_models.modeling.segic.SegIC.after_step` can queue them
  (the authors queue semantic samples only). Class keys are shared across sources by normalised
  class name (the authors key their queue by class name).

Rows are data: the epoch table holds, per sample, the source, the images, the class, each side's
variant (view, flip, warp) and a per-sample seed; everything ``build`` draws (fresh views, which
instances) comes from that seed, so a batch is a function of its rows alone: ranks take disjoint
shares of the same table and a resumed run rebuilds the same batches.

Modules by concept. Driver side (before Ray starts): :mod:`.sources` (the sources resolved against
a fold), :mod:`.stores` (their stores, extracted) and :mod:`.preparation` (the parts written into
the fold's prepared artifact). Worker side (no raw dataset read): :mod:`.part` (a source as data),
:mod:`.rendering` (label masks through a view into the model's frame) and :mod:`.sampler` (the
epoch table and the batches).
"""

from pipeline.training.segic_mixed.part import MixPart
from pipeline.training.segic_mixed.rendering import render_masks
from pipeline.training.segic_mixed.sampler import SegICMixedSampler

__all__ = ["MixPart", "SegICMixedSampler", "render_masks"]

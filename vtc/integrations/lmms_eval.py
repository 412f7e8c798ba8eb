"""Entry point of the ``lmms_eval.models`` group: ``lmms-eval --model vtc --model_args pretrained=PATH,method=cls,
ratio=0.25 --tasks mme,videomme``. Kept free of lmms-eval imports until lmms-eval calls it."""
from __future__ import annotations


def manifests() -> list:
    """The model manifest lmms-eval's registry loads (``lmms_eval/models/registry_v2.py``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="vtc", simple_class_path="vtc.integrations.lmms_eval_model.VTCModel",
                          aliases=("vtc_compressed",))]

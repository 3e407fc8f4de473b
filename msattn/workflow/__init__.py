"""The phases behind ``msattn pretrain|finetune|infer|losscurve`` (the command line is ``msattn.cli``).

- ``arguments``: the fields of each phase, dataclasses for ``HfArgumentParser`` (YAML keys and flags);
- ``data``: the byte tokenizer, the training corpus, token chunks;
- ``train``: ``pretrain`` and ``finetune`` on the HF Trainer;
- ``infer``: long-context generation, measured;
- ``losscurve``: one pretraining per selection budget, training and held-out loss.

Each phase's output directory holds what the next one loads: ``pretrain`` writes a checkpoint directory
(HF model, tokenizer, ``msattn.json``), ``finetune`` an adapter with an ``msattn.json`` naming its base,
and ``msattn.eval.loading.load`` reads both (``infer``, ``finetune`` and ``python -m msattn.eval`` use it).
"""

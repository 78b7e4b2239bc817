"""The files that pass between stages, one module per contract, each defined once.

* :mod:`~covid_ray.artifacts.experiment`: the experiment folder a search writes
  (``experiment.json``, the split, ``trials.csv``, ``history.csv``, each trial's
  ``history.jsonl``, ...), its layout, and the readers of its tables;
* :mod:`~covid_ray.artifacts.checkpoint`: a training checkpoint (``model.pt``,
  ``train_state.pt``, ``metadata.json``);
* :mod:`~covid_ray.artifacts.preprocess`: the eval preprocessing a model records (the
  ``preprocess`` of a checkpoint and of ``preprocess.json``) and its crop arithmetic;
* :mod:`~covid_ray.artifacts.bundle`: the exported ensemble folder (ONNX graphs,
  ``preprocess.json``, ``metrics.json``, the model card, the OOD head);
* :mod:`~covid_ray.artifacts.plain`: plain values for ``torch.save`` and strict JSON.

Writers and readers import the names and functions from here rather than spelling a
file name or a key again. This package imports none of its modules itself, so reading
``bundle`` (no torch, no onnx) stays cheap.
"""

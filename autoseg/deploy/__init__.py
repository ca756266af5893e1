"""Deployment, above the predictor: model archives (``autoseg export``/``import``, :mod:`.archive`), the
ONNX bundle's deployment.json (:mod:`.spec`) and INT8 quantisation with its Dice check (:mod:`.int8`)."""

"""How far to trust a prediction: quality-control flags against the training cases (:mod:`.flags`),
uncertainty maps and estimated Dice (:mod:`.uncertainty`), the calibration temperature (:mod:`.calibration`)."""

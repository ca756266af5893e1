"""A dataset on disk: images in and out (:mod:`.images`), DICOM series and DICOM-SEG (:mod:`.dicom_study`,
:mod:`.dicom_seg`), dataset layouts and their validation (:mod:`.datasets`), the dataset.json record
(:mod:`.dataset_record`) and the cross-validation splits (:mod:`.splits`)."""

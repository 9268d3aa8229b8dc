"""dicomwatch: a watch-folder DICOM sorter that never loses a file."""

__version__ = "0.1.0"

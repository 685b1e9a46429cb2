"""Batch scoring outside the server: files of any size on one machine (files: `python -m training predict`), Ray Data
datasets on many (ray_data), and the result records both write (records), from training.runtime.classifier."""

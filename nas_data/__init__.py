"""Data for search and retraining: sources (CIFAR-10/100, image folders and their tarballs,
ImageNet16-120, digits), a decoded-array cache, seeded augmentation and resumable batch order."""
from .config import DataConfig, SearchData, RetrainData, build_retrain_data, build_search_data
from .pipeline import (Augment, EpochBatchSampler, ImageDataset, PairedDataset, ShardBatchSampler, permutation,
                       sample_indices, split_indices)
from .sources import DataError, ImageSet, dataset_names, load, register_dataset, stats_for

__all__ = [
    "Augment", "DataConfig", "DataError", "EpochBatchSampler", "ImageDataset", "ImageSet", "PairedDataset",
    "RetrainData", "SearchData", "ShardBatchSampler", "build_retrain_data", "build_search_data", "dataset_names", "load", "permutation",
    "register_dataset", "sample_indices", "split_indices", "stats_for",
]

"""Datasets as they come (COCO-format JSON, the built-in shapes data), their checks, image
reading and DETR's transforms."""

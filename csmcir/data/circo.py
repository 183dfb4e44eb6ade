"""CIRCO (Baldrati et al. 2023): several ground truths per query over the COCO unlabeled2017 set.

Files under the root (the layout of the official repository, miccunifi/CIRCO):
``annotations/{val,test}.json`` (records with ``id``, ``reference_img_id``, ``target_img_id``,
``relative_caption``, ``shared_concept``, ``gt_img_ids``; test records carry no answers) and
``COCO2017_unlabeled/annotations/image_info_unlabeled2017.json`` (``images[].id``,
``images[].file_name``) with the images in ``COCO2017_unlabeled/unlabeled2017/``. The same two
items directly under the root (without ``COCO2017_unlabeled/``) are accepted too.

Protocol: the gallery is the whole unlabeled2017 set (123,403 images), ranked whole with the
reference included, as the CIRCO authors' code does (SEARLE's ``circo_compute_val_metrics`` and
``circo_generate_test_dict`` take the top 50 of all gallery scores); ``exclude_reference=True``
removes it instead. Ids are ``str(int)``, and ``targets`` lists ``target_img_id`` first, then the
other ``gt_img_ids``.
"""

from __future__ import annotations

from pathlib import Path

from csmcir.data.layout import field, read_json_list, read_json_object, require_root
from csmcir.data.records import CIRQuery, CIRSplit, unique
from csmcir.errors import DataError

SPLITS = ("val", "test")
HIDDEN_SPLITS = frozenset({"test"})
INFO_NAME = "image_info_unlabeled2017.json"
IMAGE_DIR = "unlabeled2017"
COCO_DIRS = ("COCO2017_unlabeled", ".")


def locate_coco(root: Path) -> tuple[Path, Path]:
    """(image-info file, image folder): the official layout first, then a flat one."""
    tried = []
    for sub in COCO_DIRS:
        base = root / sub
        for info in (base / "annotations" / INFO_NAME, base / INFO_NAME):
            tried.append(info)
            if info.is_file():
                return info, base / IMAGE_DIR
    raise DataError(
        f"circo: {INFO_NAME} not found (tried {', '.join(map(str, tried))}); it comes with the "
        "COCO 2017 unlabeled images (cocodataset.org, 'unlabeled2017' and its image info)"
    )


def read_gallery(info_path: Path, image_dir: Path) -> dict[str, Path]:
    info = read_json_object(info_path, "COCO image-info file")
    images = info.get("images")
    if not isinstance(images, list):
        raise DataError(f"{info_path}: expected a key 'images' holding a list")
    paths: dict[str, Path] = {}
    for i, img in enumerate(images):
        image_id = field(img, "id", info_path, i, int)
        paths[str(image_id)] = image_dir / field(img, "file_name", info_path, i, str)
    return paths


def read(root: str | Path, split: str, *, exclude_reference: bool = False) -> CIRSplit:
    root = require_root(root, "circo")
    ann_path = root / "annotations" / f"{split}.json"
    records = read_json_list(ann_path, "CIRCO annotation file")
    info_path, image_dir = locate_coco(root)
    image_paths = read_gallery(info_path, image_dir)
    hidden = split in HIDDEN_SPLITS

    def known(value: int, i: int, key: str) -> str:
        image_id = str(value)
        if image_id not in image_paths:
            raise DataError(f"{ann_path}: record #{i} {key} {image_id} is not in {info_path}")
        return image_id

    queries = []
    for i, rec in enumerate(records):
        targets: tuple[str, ...] = ()
        if not hidden:
            main = known(field(rec, "target_img_id", ann_path, i, int), i, "target_img_id")
            gts = field(rec, "gt_img_ids", ann_path, i, list)
            targets = tuple(unique([main, *(known(g, i, "gt_img_ids entry") for g in gts)]))
        extra = {"shared_concept": field(rec, "shared_concept", ann_path, i, str)}
        if "semantic_aspects" in rec:
            extra["semantic_aspects"] = rec["semantic_aspects"]
        queries.append(
            CIRQuery(
                query_id=str(field(rec, "id", ann_path, i, int)),
                reference=known(field(rec, "reference_img_id", ann_path, i, int), i, "reference"),
                texts=(field(rec, "relative_caption", ann_path, i, str),),
                targets=targets,
                extra=extra,
            )
        )
    return CIRSplit(
        benchmark="circo",
        split=split,
        queries=queries,
        gallery=list(image_paths),
        image_paths=image_paths,
        exclude_reference=exclude_reference,
    )

"""Hugging Face model folders: what is refused (one line each, saying what to do), both
generations of HF names mapping alike, and folders as ``--weights`` of the commands. (Output
parity with HF's own models is in the per-method parity tests.)"""
import json

import pytest
import torch
from hf_convert import backbone_kwargs, randomize_, save_hf
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import qdet
from qdet.cli.app import app
from qdet.weights.checkpoint import CheckpointError
from qdet.weights.hf_format import HFFormatError, hf_to_official

transformers = pytest.importorskip("transformers")


def folder_with(tmp_path, config: dict | None, weights: bool = True):
    folder = tmp_path / "model"
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if weights:
        save_file({"x": torch.zeros(1)}, folder / "model.safetensors")
    return folder


def test_unconverted_model_type_lists_those_converted(tmp_path):
    folder = folder_with(tmp_path, {"model_type": "yolos",
                                    "architectures": ["YolosForObjectDetection"]})
    with pytest.raises(HFFormatError, match="'YolosForObjectDetection' is not one qdet "
                                            "converts; it converts detr, conditional_detr, "
                                            "deformable_detr"):
        qdet.load(folder)


def test_segmentation_model_is_refused(tmp_path):
    folder = folder_with(tmp_path, {"model_type": "detr",
                                    "architectures": ["DetrForSegmentation"]})
    with pytest.raises(HFFormatError, match="DetrForSegmentation"):
        qdet.load(folder)


def test_folder_without_weights_or_config(tmp_path):
    with pytest.raises(CheckpointError, match="has config.json but no weights: put its "
                                              "model.safetensors"):
        qdet.load(folder_with(tmp_path, {"model_type": "detr"}, weights=False))
    with pytest.raises(CheckpointError, match="not a Hugging Face model folder"):
        qdet.load(folder_with(tmp_path / "b", None))


def test_weights_of_another_layout(tmp_path):
    with pytest.raises(HFFormatError, match="do not fit detr's layout"):
        qdet.load(folder_with(tmp_path, {"model_type": "detr"}))


@pytest.mark.parametrize("kind", ["conditional", "deformable-two-stage"])
def test_both_generations_of_names_map_alike(kind, tmp_path):
    """transformers 5's in-memory names and the file names map to the same official dict."""
    from transformers import (
        ConditionalDetrConfig,
        ConditionalDetrForObjectDetection,
        DeformableDetrConfig,
        DeformableDetrForObjectDetection,
    )

    common = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                  num_queries=6, num_labels=3)
    if kind == "conditional":
        model_type = "conditional_detr"
        hf = ConditionalDetrForObjectDetection(ConditionalDetrConfig(
            **backbone_kwargs("hf-resnet", ["stage4"]), **common))
    else:
        model_type = "deformable_detr"
        hf = DeformableDetrForObjectDetection(DeformableDetrConfig(
            **backbone_kwargs("hf-resnet", ["stage2", "stage3", "stage4"]), **common,
            encoder_n_points=2, decoder_n_points=2, two_stage_num_proposals=6,
            with_box_refine=True, two_stage=True))
    randomize_(hf)
    folder = save_hf(hf, tmp_path / kind)
    config = json.loads((folder / "config.json").read_text())
    in_memory = hf_to_official(hf.state_dict(), model_type, config)
    on_disk = hf_to_official(load_file(folder / "model.safetensors"), model_type, config)
    assert set(in_memory) == set(on_disk)
    for k in on_disk:
        assert torch.equal(in_memory[k], on_disk[k]), k


def test_folder_as_predict_weights(tmp_path):
    from transformers import DetrConfig, DetrForObjectDetection

    from qdet.data.shapes import ShapesConfig, render

    torch.manual_seed(0)
    cfg = DetrConfig(**backbone_kwargs("hf-resnet", ["stage4"]), d_model=32, encoder_layers=1,
                     decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                     encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5, num_labels=2,
                     id2label={0: "cat", 1: "dog"})
    folder = save_hf(DetrForObjectDetection(cfg), tmp_path / "detr")
    render(ShapesConfig(image_size=64), "val", 0)[0].save(tmp_path / "img.png")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "img.png"), "--weights",
                                      str(folder), "--threshold", "0", "--out",
                                      str(tmp_path / "pred"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    found = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert {d["name"] for d in found[0]["detections"]} <= {"cat", "dog"}
    assert len(found[0]["detections"]) == 5

"""Loading the released layout: file names, keys, shapes, sizes read from files, and clear errors."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_image, tiny_settings

from mgie_engine.errors import CheckpointError, ModelUnavailableError
from mgie_engine.models import load_models
from mgie_engine.pipeline import EditRequest, MgiePipeline
from mgie_engine.settings import EngineSettings
from mgie_engine.tiny.writer import TinySizes, write_tiny_checkpoints


def test_tiny_layout_is_the_released_one(tiny_paths):
    llava, mgie = tiny_paths.mgie / "LLaVA-7B-v1", tiny_paths.mgie / "mgie_7b"
    for name in ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "added_tokens.json",
                 "special_tokens_map.json", "pytorch_model.bin.index.json"):
        assert (llava / name).is_file(), name
    config = json.loads((llava / "config.json").read_text())
    assert config["model_type"] == "llava" and config["mm_use_im_start_end"] is True
    assert config["mm_vision_select_layer"] == -2 and config["mm_vision_tower"]
    assert json.loads((llava / "added_tokens.json").read_text()) == {"<im_patch>": 32000, "<im_start>": 32001,
                                                                      "<im_end>": 32002}
    index = json.loads((llava / "pytorch_model.bin.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"pytorch_model-0000{i}-of-0000{len(shards)}.bin" for i in range(1, len(shards) + 1)]
    assert "model.mm_projector.weight" in index["weight_map"]
    assert not any("vision_tower" in k for k in index["weight_map"])

    mllm = torch.load(mgie / "mllm.pt", weights_only=True)
    assert {k for k in mllm if not k.startswith("edit_head.")} == {"model.embed_tokens.weight", "lm_head.weight", "emb"}
    assert all(v.dtype == torch.float16 for v in mllm.values())
    assert mllm["model.embed_tokens.weight"].shape[0] == 32011 == mllm["lm_head.weight"].shape[0]
    assert mllm["emb"].shape == (1, 8, config["hidden_size"])
    assert "edit_head.query" in mllm and mllm["edit_head.query"].shape[1] == 77
    unet = torch.load(mgie / "unet.pt", weights_only=True)
    assert unet["conv_in.weight"].shape[1] == 8 and not any(k.startswith("unet.") for k in unet)
    for name in ("scheduler/scheduler_config.json", "unet/config.json", "vae/config.json", "model_index.json"):
        assert (tiny_paths.ip2p / name).is_file(), name
    assert (tiny_paths.clip / "preprocessor_config.json").is_file()


def test_loader_reads_sizes_from_the_files(tmp_path):
    """Other widths everywhere: nothing in the engine may assume 4096, 1024, 768 or 256 patches."""
    sizes = TinySizes(hidden=48, intermediate=80, layers=3, heads=6, clip_width=24, clip_layers=2, clip_image=42,
                      head_width=20, head_queries=9, head_layers=1, cross_attention=40)
    paths = write_tiny_checkpoints(tmp_path, seed=5, sizes=sizes)
    models = load_models(tiny_settings(paths))
    assert models.llm.config.hidden_size == 48 and models.num_patches == 9
    assert models.null_embeds.shape == (1, 9, 40)
    result = MgiePipeline(models, max_side=32)(EditRequest(image=make_image(40, 24), instruction="add a hat", steps=2))
    assert result.image.size == (32, 16)


def test_same_seed_same_files(tmp_path):
    a = write_tiny_checkpoints(tmp_path / "a", seed=3)
    b = write_tiny_checkpoints(tmp_path / "b", seed=3)
    for name in ("LLaVA-7B-v1/tokenizer.json", "LLaVA-7B-v1/config.json"):
        assert (a.mgie / name).read_bytes() == (b.mgie / name).read_bytes()
    sa = torch.load(a.mgie / "mgie_7b/mllm.pt", weights_only=True)
    sb = torch.load(b.mgie / "mgie_7b/mllm.pt", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture()
def tiny_copy(tiny_paths, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_paths.root, dst)
    from mgie_engine.tiny.writer import TinyPaths

    return TinyPaths.under(dst)


def _load_error(paths) -> str:
    with pytest.raises(CheckpointError) as info:
        load_models(tiny_settings(paths))
    return str(info.value)


def test_missing_mllm_names_the_file(tiny_copy):
    (tiny_copy.mgie / "mgie_7b" / "mllm.pt").unlink()
    msg = _load_error(tiny_copy)
    assert "mllm.pt" in msg and "hf download" in msg and "MGIE_CKPT_DIR" in msg


def test_truncated_unet_names_the_file(tiny_copy):
    path = tiny_copy.mgie / "mgie_7b" / "unet.pt"
    path.write_bytes(path.read_bytes()[:1000])
    msg = _load_error(tiny_copy)
    assert "unet.pt" in msg and "download it again" in msg


def test_bad_config_json_names_the_file(tiny_copy):
    (tiny_copy.mgie / "LLaVA-7B-v1" / "config.json").write_text("{not json")
    assert "config.json" in _load_error(tiny_copy)


def test_missing_shard_names_the_shard(tiny_copy):
    (tiny_copy.mgie / "LLaVA-7B-v1" / "pytorch_model-00002-of-00002.bin").unlink()
    assert "pytorch_model-00002-of-00002.bin" in _load_error(tiny_copy)


def test_mllm_from_another_model_is_refused(tiny_copy):
    path = tiny_copy.mgie / "mgie_7b" / "mllm.pt"
    sd = torch.load(path, weights_only=True)
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:-1]
    torch.save(sd, path)
    msg = _load_error(tiny_copy)
    assert "mllm.pt" in msg and "32010" in msg


def test_wrong_clip_tower_is_refused(tiny_copy, tmp_path):
    other = write_tiny_checkpoints(tmp_path / "other", seed=1, sizes=TinySizes(clip_width=24))
    shutil.rmtree(tiny_copy.clip)
    shutil.copytree(other.clip, tiny_copy.clip)
    msg = _load_error(tiny_copy)
    assert "MGIE_CLIP" in msg and "24" in msg


def test_missing_ip2p_folder(tiny_copy):
    shutil.rmtree(tiny_copy.ip2p / "scheduler")
    assert "scheduler_config.json" in _load_error(tiny_copy)


def test_offline_hub_gives_a_clear_error():
    with pytest.raises(ModelUnavailableError) as info:
        load_models(EngineSettings(ckpt_dir=None, device="cpu"))
    assert "tsujuifu/ml-mgie" in str(info.value) and "offline" in str(info.value)


def _weights_commands() -> dict[str, str]:
    from mgie_engine import checkpoints as ck

    return {"MGIE_CKPT_DIR": ck.download_command("tsujuifu/ml-mgie", ck.MGIE_PATTERNS),
            "MGIE_IP2P": ck.download_command("timbrooks/instruct-pix2pix", ck.IP2P_PATTERNS),
            "MGIE_CLIP": ck.download_command("openai/clip-vit-large-patch14", ck.CLIP_PATTERNS)}


def test_offline_errors_name_the_hf_command_and_the_setting_to_point_there(tiny_copy):
    with pytest.raises(ModelUnavailableError) as info:
        load_models(EngineSettings(ckpt_dir=None, device="cpu"))
    msg = str(info.value)
    assert _weights_commands()["MGIE_CKPT_DIR"] in msg and "MGIE_CKPT_DIR=" in msg
    assert ".." not in msg.replace("../", "") and "\n" not in msg
    with pytest.raises(ModelUnavailableError) as info:
        load_models(dataclasses.replace(tiny_settings(tiny_copy), ip2p="timbrooks/instruct-pix2pix"))
    assert _weights_commands()["MGIE_IP2P"] in str(info.value) and "MGIE_IP2P=" in str(info.value)


def test_the_download_tool_named_is_the_one_huggingface_hub_installs():
    from importlib.metadata import distribution

    scripts = {ep.name for ep in distribution("huggingface_hub").entry_points if ep.group == "console_scripts"}
    assert {command.split()[0] for command in _weights_commands().values()} <= scripts


def test_the_readme_shows_the_same_download_commands():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for setting, command in _weights_commands().items():
        assert command in readme and f"{setting}=" in readme
    assert "huggingface-cli" not in readme


def test_the_released_pad_token_id_of_minus_one_loads_without_a_warning(tiny_copy):
    config_path = tiny_copy.mgie / "LLaVA-7B-v1" / "config.json"
    config = json.loads(config_path.read_text())
    config["pad_token_id"] = -1  # as in the released LLaVA-7B-v1 config.json
    config_path.write_text(json.dumps(config))
    messages: list[str] = []
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    hf_logger = logging.getLogger("transformers")  # transformers' loggers do not propagate to the root
    hf_logger.addHandler(handler)
    try:
        models = load_models(tiny_settings(tiny_copy), progress=messages.append)
    finally:
        hf_logger.removeHandler(handler)
    assert not [w for w in warnings if "pad_token_id" in w], warnings
    assert models.llm.generation_config.pad_token_id is None
    assert all(not m.startswith("moving") for m in messages) and len(messages) >= 5  # shown as "loading <m>..."

"""Model folders are checked before loading: errors name the folder, the file and what does not match, absurd
configs are refused from the config alone, and pickles holding code are refused without running it."""
import json
import os

import pytest
import torch

from jointcore import predictor as JP
from jointcore.jointnet import JointNet
from jointcore.models import preflight as PF
from predictor_ckpt import make_checkpoint
from tiny import tiny_unet


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _jointnet(tmp_path, safe=True):
    root = tmp_path / "jn"
    JointNet.from_unet(tiny_unet()).save_pretrained(root, safe_serialization=safe)
    return root


def test_invalid_json_names_file_line_and_column(tmp_path):
    root = _jointnet(tmp_path)
    (root / "jointnet" / "config.json").write_text('{"in_channels": 4,,}')
    with pytest.raises(ValueError, match=r"jointnet/config.json is not valid JSON .* line 1, column 19"):
        JointNet.from_pretrained(root)
    (root / "jointnet" / "config.json").write_text('[1, 2]')
    with pytest.raises(ValueError, match=r"jointnet/config.json must hold a JSON object"):
        JointNet.from_pretrained(root)


def test_weights_of_another_model_name_branch_file_and_tensor(tmp_path):
    root = _jointnet(tmp_path)
    cfg_p = root / "unet" / "config.json"
    cfg = json.loads(cfg_p.read_text())
    cfg["block_out_channels"] = [c * 2 for c in cfg["block_out_channels"]]
    cfg_p.write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        JointNet.from_pretrained(root)
    msg = str(e.value)
    assert f"{root / 'unet'}: the weights in diffusion_pytorch_model.safetensors do not match its config.json" in msg
    assert "in the file" in msg and "from config.json" in msg and "ignore_mismatched_sizes" not in msg


def test_absurd_config_is_refused_from_the_config_alone(tmp_path):
    root = _jointnet(tmp_path)
    cfg_p = root / "jointnet" / "config.json"
    cfg = json.loads(cfg_p.read_text())
    cfg["block_out_channels"] = [1_000_000, 2_000_000]
    cfg_p.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"jointnet/config.json describes a model of [0-9.]+ B parameters"):
        JointNet.from_pretrained(root)


def test_model_larger_than_memory_is_refused(tmp_path):
    model = PF.meta_model(lambda: torch.nn.Linear(1000, 1000), "x/config.json")
    assert PF.check_size(model, "x/config.json", 4, available=10**9) == 1001000
    with pytest.raises(MemoryError, match=r"x/config.json describes a model of 1 M parameters that needs 0.0 GiB, "
                                          r"but only 0.0 GiB"):
        PF.check_size(model, "x/config.json", 4, available=1000)


@pytest.mark.parametrize("where", ["jointnet", "predictor"])
def test_pickle_with_code_is_refused_without_running_it(tmp_path, where):
    marker = tmp_path / "pwned"
    if where == "jointnet":
        root = _jointnet(tmp_path, safe=False)
        target = root / "jointnet" / "diffusion_pytorch_model.bin"
        load = lambda: JointNet.from_pretrained(root)  # noqa: E731
    else:
        root = tmp_path / "ckpt"
        make_checkpoint(str(root), safe_serialization=False)
        target = root / "unet" / "diffusion_pytorch_model.bin"
        load = lambda: JP.load_predictor(str(root))  # noqa: E731
    torch.save({"conv_in.weight": _Evil(str(marker))}, target)
    with pytest.raises(ValueError, match=r"holds Python objects other than tensors .*posix.system.*refused"):
        load()
    assert not marker.exists()


def test_truncated_safetensors_names_the_file(tmp_path):
    root = tmp_path / "ckpt"
    make_checkpoint(str(root))
    f = root / "vae" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"vae/diffusion_pytorch_model.safetensors is not a readable safetensors"):
        JP.load_predictor(str(root))


def test_invalid_scheduler_and_model_index_json_name_the_file(tmp_path):
    root = tmp_path / "ckpt"
    make_checkpoint(str(root))
    (root / "scheduler" / "scheduler_config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"scheduler/scheduler_config.json is not valid JSON"):
        JP.load_predictor(str(root))
    make_checkpoint(str(tmp_path / "ok"))
    (tmp_path / "ok" / "model_index.json").write_text("{")
    with pytest.raises(ValueError, match=r"ok/model_index.json is not valid JSON"):
        JP.load_predictor(str(tmp_path / "ok"))


def test_corrupt_lpips_file_names_the_file(tmp_path):
    import lpips

    from jointcore.metrics_pano import load_lpips_backbone_weights

    bad = tmp_path / "alexnet-owt-7be5be79.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    model = lpips.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False)
    with pytest.raises(ValueError, match=r"LPIPS backbone file .*alexnet-owt-7be5be79.pth is not a readable "
                                         r"PyTorch weight file"):
        load_lpips_backbone_weights(model, str(bad))

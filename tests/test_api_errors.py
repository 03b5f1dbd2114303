"""The library and the data: 16-bit images, integral arguments of any type, arguments refused up
front with a ValueError/TypeError, no DDP deprecation warning, a README snippet that runs as written."""

import ast
import builtins
import io
import re
import time
import tokenize
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastglow
from fastglow.app.data import load_dataset
from fastglow.app.distributed import Dist, _no_buffer_sync_in_forward, wrap_model
from fastglow.app.errors import InputError


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_item7_16_bit_images_are_scaled_to_8_bits_not_clipped(tmp_path, mode):
    gradient = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535
    name = "g.png" if mode == "I;16" else "g.tif"  # Pillow writes 32-bit "I" to TIFF, not PNG
    Image.fromarray(gradient if mode == "I;16" else gradient.astype(np.int32)).save(tmp_path / name)
    assert Image.open(tmp_path / name).mode == mode
    levels, n_bins = load_dataset(str(tmp_path), img_size=16, n_bits=8)
    assert n_bins == 256 and torch.equal(levels[0, 0], torch.from_numpy(np.arange(256).reshape(16, 16)).byte())
    assert load_dataset(str(tmp_path), img_size=16, channels=3, n_bits=8)[0][0, :, 15, 15].tolist() == [255] * 3


def test_item7_float_images_are_refused_in_one_line(tmp_path):
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(tmp_path / "f.tif")
    with pytest.raises(InputError, match="f.tif: floating-point image"):
        load_dataset(str(tmp_path), img_size=8)


def test_item10_numpy_integers_are_accepted():
    model = fastglow.Glow(np.int64(1), np.int32(1), np.int64(2), hidden_channels=np.int64(4))
    assert type(model.n_block) is int and type(model.in_channel) is int
    log_p, _, _ = model(torch.rand(2, 1, 8, 8) - 0.5)
    assert log_p.shape == (2,)
    assert model.sample(np.int64(2), img_size=np.int64(8)).shape == (2, 1, 8, 8)
    assert fastglow.z_shapes(np.int64(1), np.int64(8), np.int64(2)) == [(2, 4, 4), (8, 2, 2)]


def test_item10_absurd_n_block_is_refused_before_allocating():
    start = time.perf_counter()
    with pytest.raises(ValueError, match="n_block=20"):
        fastglow.Glow(1, 1, 20)
    assert time.perf_counter() - start < 1.0
    with pytest.raises(TypeError, match="n_block"):
        fastglow.Glow(1, 1, np.bool_(True))


@pytest.mark.parametrize("call,error,match", [
    (lambda: fastglow.z_shapes(3, 6, 2), ValueError, "multiples of 2\\*\\*n_block = 4"),
    (lambda: fastglow.z_shapes(3, (8, 10), 2), ValueError, "multiples"),
    (lambda: fastglow.z_shapes(3, 8.0, 2), TypeError, "img_size"),
    (lambda: fastglow.z_shapes(0, 8, 2), ValueError, "in_channel"),
    (lambda: fastglow.bits_per_dim(torch.zeros(1), torch.zeros(1), (1, 8, 8), 0), ValueError, "n_bins"),
    (lambda: fastglow.bits_per_dim(torch.zeros(1), torch.zeros(1), (1, 8, 8), -3), ValueError, "n_bins"),
    (lambda: fastglow.bits_per_dim(torch.zeros(1), torch.zeros(1), (1, 8, 8), float("nan")), ValueError, "n_bins"),
    (lambda: fastglow.bits_per_dim(torch.zeros(1), torch.zeros(1), (1, 8, 8), "256"), TypeError, "n_bins"),
    (lambda: fastglow.Glow(1, 1, 2, hidden_channels=4).sample(2, img_size="8"), TypeError, "img_size"),
    (lambda: fastglow.Glow(1, 1, 2, hidden_channels=4).sample(2, float("nan"), 8), ValueError, "temperature"),
])
def test_item10_arguments_refused_up_front(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_item10_ddp_wrapping_raises_no_future_warning(tmp_path):
    import torch.distributed as torch_dist
    from torch.nn.parallel import DistributedDataParallel

    torch_dist.init_process_group("gloo", store=torch_dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                                  world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            # world=2 takes wrap_model's torchrun path; the process group itself has one member
            net = wrap_model(fastglow.Glow(1, 1, 2, hidden_channels=4), Dist(0, 2, torch.device("cpu")))
        # forward_sync_buffers where this torch has it, else broadcast_buffers (the library's own fallback)
        (flag, value), = _no_buffer_sync_in_forward().items()
        assert isinstance(net, DistributedDataParallel) and value is False and getattr(net, flag) is False
    finally:
        torch_dist.destroy_process_group()


def _readme_snippet() -> str:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    use = readme[readme.index("## Use"):]
    return re.search(r"```python\n(.*?)```", use, re.S).group(1)


def _unbound_names(code: str) -> set[str]:
    tree = ast.parse(code)
    bound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    bound |= {(a.asname or a.name).split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
              for a in n.names}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return used - bound - set(dir(builtins))


def test_item10_readme_snippet_runs_and_its_comments_name_nothing_undefined(tmp_path, monkeypatch):
    code = _readme_snippet()
    comments = [tok.string.lstrip("# ") for tok in tokenize.generate_tokens(io.StringIO(code).readline)
                if tok.type == tokenize.COMMENT]
    for comment in comments:  # code shown in a comment ("# or model.reverse(...)") must run as written too
        candidate = re.sub(r"^(or|e\.g\.|i\.e\.)\s+", "", comment)
        try:
            ast.parse(candidate)
        except SyntaxError:
            continue
        assert not _unbound_names(code + "\n" + candidate), comment
    assert not _unbound_names(code)
    full_size = fastglow.Glow  # the snippet's model at K=1, width 8: the same code path, seconds not minutes
    monkeypatch.setattr(fastglow, "Glow", lambda *a, **k: full_size(*a, **{**k, "n_flow": 1, "hidden_channels": 8}))
    monkeypatch.chdir(tmp_path)
    torch.save(full_size(3, 1, 4, hidden_channels=8).state_dict(), "rosinality_checkpoint.pt")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["imgs"].shape == (16, 3, 64, 64)

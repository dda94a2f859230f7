"""Safe checkpoint loading (seed spec §2.3-§2.5): every published form, numpy scalars, refusal of code."""

from __future__ import annotations

import hashlib
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import (
    OPT_GROUP_SIZES,
    OPT_STATE_ENTRIES,
    random_state_dict,
    save_fastai_checkpoint,
    save_malicious_checkpoint,
)

from cxrage_ray.errors import UnsafeCheckpointError, WeightsError
from cxrage_ray.model.checkpoint import convert_to_safetensors, load_state_dict
from cxrage_ray.model.network import expected_shapes
from cxrage_ray.storage.atomic import current_umask
from cxrage_ray.storage.digest import sha256_file

FORMS = [(legacy, with_opt) for legacy in (True, False) for with_opt in (True, False)]


@pytest.fixture(scope="module")
def state_dict():
    return random_state_dict(seed=7)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def published_like(state_dict, ckpt_dir) -> Path:
    """The published file's form: fastai with-opt, legacy container."""
    return save_fastai_checkpoint(ckpt_dir / "legacy_opt.pth", state_dict, legacy=True, with_opt=True)


def _assert_identical(loaded, reference):
    assert list(loaded) == list(expected_shapes())  # canonical key order
    for key, value in reference.items():
        assert loaded[key].dtype == value.dtype, key
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("legacy,with_opt", FORMS, ids=[f"{'legacy' if l else 'zip'}-{'opt' if o else 'bare'}"
                                                        for l, o in FORMS])
def test_every_form_loads_to_identical_tensors(state_dict, ckpt_dir, published_like, legacy, with_opt):
    path = published_like if (legacy, with_opt) == (True, True) else save_fastai_checkpoint(
        ckpt_dir / f"{legacy}_{with_opt}.pth", state_dict, legacy=legacy, with_opt=with_opt)
    with open(path, "rb") as f:
        head = f.read(2)
    assert (head == b"PK") == (not legacy)  # the container really is the one asked for
    _assert_identical(load_state_dict(path), state_dict)


def test_with_opt_checkpoint_has_the_published_optimizer_layout(published_like):
    """The builder writes Appendix B's layout, numpy.float64 values included (read here with full pickle:
    a file this test wrote itself)."""
    obj = torch.load(published_like, weights_only=False)
    assert set(obj) == {"model", "opt"}
    opt = obj["opt"]
    assert len(opt["state"]) == OPT_STATE_ENTRIES
    assert tuple(len(g["params"]) for g in opt["param_groups"]) == OPT_GROUP_SIZES == (16, 32, 20, 40, 2, 6)
    group = opt["param_groups"][0]
    assert type(group["lr"]) is np.float64 and type(group["betas"][0]) is np.float64
    assert type(group["betas"][1]) is float and group["weight_decay"] == 0
    assert set(group) == {"lr", "betas", "eps", "weight_decay", "amsgrad", "params"}  # torch 1.5 keys
    # state shapes follow the params: index 0 is conv1, the last two are BN1d(1024)
    assert opt["state"][0]["exp_avg"].shape == (64, 3, 7, 7)
    assert opt["state"][111]["exp_avg"].shape == (1024,)
    assert 112 not in opt["state"]  # the replaced head's params never got state


def test_numpy_scalars_break_plain_weights_only_but_load_here(published_like):
    """Spec §2.5: torch's default weights_only load fails on the fastai file; ours reads it."""
    with pytest.raises(pickle.UnpicklingError, match="numpy"):
        torch.load(published_like, weights_only=True)
    assert len(load_state_dict(published_like)) == 237


def test_numpy1_scalar_module_name_loads(state_dict, published_like, tmp_path):
    """A file pickled under numpy 1 names `numpy.core.multiarray.scalar`; it must load under numpy 2 too."""
    data = published_like.read_bytes()
    current = f"{np.float64(0).__reduce__()[0].__module__}\nscalar".encode()
    old = b"numpy.core.multiarray\nscalar"
    assert current in data or old in data
    patched = tmp_path / "numpy1.pth"
    patched.write_bytes(data.replace(current, old))
    assert old in patched.read_bytes()
    _assert_identical(load_state_dict(patched), state_dict)


def test_safetensors_conversion_round_trip(state_dict, published_like, tmp_path):
    dst = tmp_path / "sub" / "cxr_age.safetensors"
    sha = convert_to_safetensors(published_like, dst)
    assert sha == hashlib.sha256(dst.read_bytes()).hexdigest()
    assert [p.name for p in dst.parent.iterdir()] == [dst.name]  # written whole: no temporary file left
    assert (dst.stat().st_mode & 0o777) == 0o666 & ~current_umask()  # open()'s permissions, not mkstemp's
    _assert_identical(load_state_dict(dst), state_dict)
    from safetensors import safe_open

    with safe_open(str(dst), "pt") as f:
        assert f.metadata()["source_sha256"] == sha256_file(published_like)
    # deterministic: converting again gives the same bytes (the sha256 is recorded with every output row)
    assert convert_to_safetensors(published_like, tmp_path / "again.safetensors") == sha
    # a safetensors file is recognised by its header even without the extension
    renamed = tmp_path / "weights.bin"
    dst.rename(renamed)
    _assert_identical(load_state_dict(renamed), state_dict)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
@pytest.mark.parametrize("payload,global_name", [("system", "posix.system"), ("open", "io.open")])
def test_malicious_pickle_is_refused_without_running(tmp_path, legacy, payload, global_name):
    marker = tmp_path / "pwned"
    path = save_malicious_checkpoint(tmp_path / "evil.pth", marker, legacy=legacy, payload=payload)
    # the file really would run the payload under an unrestricted unpickler: its pickle names the global
    ops = _pickle_globals(path, legacy)
    assert global_name in ops
    with pytest.raises(UnsafeCheckpointError, match=rf"`{global_name}`") as info:
        load_state_dict(path)
    assert isinstance(info.value, WeightsError)
    assert "nothing in it was executed" in str(info.value)
    assert not marker.exists()


def _pickle_globals(path: Path, legacy: bool) -> set[str]:
    """Globals named by the checkpoint's main pickle, read with pickletools (which never executes)."""
    import zipfile

    if legacy:
        with open(path, "rb") as f:
            for _ in range(3):  # magic number, protocol version, sys info
                for _ in pickletools.genops(f):
                    pass
            ops = list(pickletools.genops(f))
    else:
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith("data.pkl"))
            ops = list(pickletools.genops(z.read(name)))
    names = set()
    for i, (op, arg, _) in enumerate(ops):
        if op.name == "GLOBAL":
            names.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            names.add(f"{ops[i - 4][1]}.{ops[i - 2][1]}")
    return names


def test_wrong_shapes_and_foreign_state_dicts_raise_weights_error(state_dict, tmp_path):
    bad = dict(state_dict)
    bad["1.8.weight"] = torch.zeros(8, 512)
    path = save_fastai_checkpoint(tmp_path / "bad.pth", bad, legacy=False, with_opt=False)
    with pytest.raises(WeightsError, match=r"1\.8\.weight: \(8, 512\) \(expected \(16, 512\)\)"):
        load_state_dict(path)
    foreign = tmp_path / "foreign.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, foreign)
    with pytest.raises(WeightsError, match=r"missing keys: 0\.0\.weight.*\(237 in all\).*unexpected keys: fc\.weight"):
        load_state_dict(foreign)


def test_unreadable_files_raise_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_state_dict(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(WeightsError, match="could not be read"):
        load_state_dict(garbage)
    a_list = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], a_list)
    with pytest.raises(WeightsError, match="holds a list"):
        load_state_dict(a_list)


def test_truncated_checkpoint_raises_weights_error(published_like, tmp_path):
    cut = tmp_path / "cut.pth"
    with open(published_like, "rb") as src:
        cut.write_bytes(src.read(1_000_000))
    with pytest.raises(WeightsError):
        load_state_dict(cut)


def test_sha256_file_streams_large_files(tmp_path):
    data = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)  # crosses several 1 MiB chunks
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(path)) == hashlib.sha256(data).hexdigest()


def test_one_file_hash_for_checkpoints_and_the_registry():
    """checkpoint and registry hash weights with the same helper (storage.digest), so the two never disagree."""
    from cxrage_ray.model import checkpoint, registry

    assert checkpoint.sha256_file is registry.sha256_file is sha256_file

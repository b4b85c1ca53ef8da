"""The shared base: zero-shot head, fingerprint, save/load round trip, stand-in cache."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from soup_ray.model import load_base, state_fingerprint
from soup_ray.standin import ensure_standin, standin_dir


def test_zero_shot_head_is_argmax_cosine_to_prompt_embeddings(prepared) -> None:
    import open_clip

    cfg, prep = prepared
    clf, meta = load_base(prep.base_dir)
    clip = open_clip.create_model(f"local-dir:{prep.base_dir}", pretrained=None)
    clip.eval()
    tok = open_clip.get_tokenizer(f"local-dir:{prep.base_dir}")
    bundle = prep.bundle
    # class prompt embeddings computed here independently of open_clip's zero-shot helper
    with torch.no_grad():
        class_emb = []
        for name in bundle.classnames:
            e = clip.encode_text(tok([t(name) for t in bundle.templates]))
            e = e / e.norm(dim=-1, keepdim=True)
            e = e.mean(0)
            class_emb.append(e / e.norm())
        class_emb = torch.stack(class_emb)
        x, _ = bundle.heldout.tensors
        img = clip.encode_image((x - clf.image_mean) / clf.image_std)
        img = img / img.norm(dim=-1, keepdim=True)
        expected = (img @ class_emb.T).argmax(1)
        got = clf(x).argmax(1)
    assert torch.equal(got, expected)
    assert meta["classnames"] == bundle.classnames


def test_fingerprint_is_stable_and_sensitive(prepared) -> None:
    _, prep = prepared
    clf, meta = load_base(prep.base_dir)
    sd = clf.state_dict()
    assert state_fingerprint(sd) == meta["fingerprint"] == prep.fingerprint
    k = next(iter(sd))
    sd2 = {kk: v.clone() for kk, v in sd.items()}
    sd2[k].view(-1)[0] += 1e-3
    assert state_fingerprint(sd2) != meta["fingerprint"]


def test_standin_cache_is_reused(cache_dir: Path) -> None:
    logs: list[str] = []
    folder = ensure_standin(steps=3, seed=7, log=logs.append)
    assert folder == standin_dir("soupray-digits-tiny", 3, 7)
    assert any("building" in m for m in logs)
    weights = folder / "open_clip_model.safetensors"
    mtime = weights.stat().st_mtime_ns
    logs.clear()
    t0 = time.time()
    again = ensure_standin(steps=3, seed=7, log=logs.append)
    assert again == folder and logs == [] and weights.stat().st_mtime_ns == mtime
    assert time.time() - t0 < 5
    # another recipe is another cache entry
    assert standin_dir("soupray-digits-tiny", 4, 7) != folder


def test_standin_is_deterministic(cache_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from soup_ray.standin import pretrain_standin

    pretrain_standin("soupray-digits-tiny", 2, 11, tmp_path / "a", batch_size=16, log=lambda m: None)
    pretrain_standin("soupray-digits-tiny", 2, 11, tmp_path / "b", batch_size=16, log=lambda m: None)
    a = load_file(str(tmp_path / "a" / "open_clip_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "open_clip_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the build time stays out of the weights file: two builds are the same file, and its checksum says so
    raw_a = (tmp_path / "a" / "open_clip_model.safetensors").read_bytes()
    assert raw_a == (tmp_path / "b" / "open_clip_model.safetensors").read_bytes()
    meta = json.loads((tmp_path / "a" / "standin.json").read_text())
    assert meta["weights_sha256"] == hashlib.sha256(raw_a).hexdigest() and meta["seconds"] >= 0


def test_standin_loads_through_open_clip_local_dir(cache_dir: Path) -> None:
    import open_clip

    folder = ensure_standin(steps=3, seed=7, log=lambda m: None)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    from safetensors.torch import load_file

    saved = load_file(str(folder / "open_clip_model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)

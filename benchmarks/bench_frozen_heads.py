"""How far heads on the frozen offline encoders go: the ceiling behind issue 24's recipe.

    python -m benchmarks.bench_frozen_heads            # real_retrieval's split (~15 min, 2 cores)
    python -m benchmarks.bench_frozen_heads --smoke    # 60 photos, 2 epochs: checks the script

Same held-out split as ``benchmarks/real_retrieval.py`` (1,000 Flickr8k photos, 5,000 captions,
chosen by a hash of the file name; the other 4,000 photos train). Both towers stay locked:
EfficientNet-Lite0 (ImageNet) runs once per photo on shard's 224 px centre square (and once on
its mirror image), MiniLM once per caption; every variant then trains only what sits on those
features (symmetric InfoNCE, learned temperature, AdamW, one-cycle, one caption per photo per
step) and is scored with real_retrieval's protocol (each caption queries all 1,000 photos; each
photo queries all 5,000 captions, a hit for any of its own). Variants:

- linear heads on the pooled features (real_retrieval's frozen row);
- two-layer MLP heads; image tokens (the 7x7 grid) pooled by GPO (VSE-infinity) or by
  learned-query attention; MiniLM's word-piece tokens pooled the same ways;
- the pooled outputs of six EfficientNet stages, concatenated (colour and texture live in the
  early ones);
- mirror-image augmentation in training + averaging both views at test time;
- kNN caption transfer (a photo = the mean caption of its nearest training photos);
- CSLS hub correction (each side's mean similarity to its 50 nearest training items subtracted).

What it shows: the image features, not the heads, bound retrieval here; every variant lands
within a few points of the linear heads.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import _common as c
from benchmarks.real_retrieval import DATA, split_collection

NAME = "frozen_heads"
STAGE_ENDS = (5, 8, 11, 15, 16, 17)  # EfficientNet-Lite0 layer groups ending a stage; 17 = head
STAGE_DIMS = (40, 80, 112, 192, 320, 1280)


def extract(split: Path, size: int) -> dict[str, Any]:
    """Locked-tower features of one collection: the image grid (and its mirror's), the six
    stages' pooled outputs, MiniLM's tokens and pooled sentence embedding."""
    import numpy as np
    import torch
    from PIL import Image

    from mmpipe.model.image import EfficientNetLite0Encoder
    from mmpipe.model.text import MiniLMTextEncoder
    from mmpipe.shard import sample_image

    rows = [json.loads(line) for line in (split / "captions.jsonl").read_text().splitlines()]
    images = sorted({r["image"] for r in rows})
    index = {p: i for i, p in enumerate(images)}
    image_enc, text_enc = EfficientNetLite0Encoder().eval(), MiniLMTextEncoder(32).eval()
    grids, flips, stages = [], [], []
    with torch.no_grad():
        for start in range(0, len(images), 32):
            batch = []
            for p in images[start : start + 32]:
                with Image.open(split / p) as im:
                    pic = np.array(sample_image(im, size))  # shard's stored picture
                batch.append(torch.from_numpy(pic).permute(2, 0, 1))
            x = torch.stack(batch).float().div(255).sub(0.5).div(0.5)
            pooled, h, g0 = [], x, 0
            for end in STAGE_ENDS:
                h, g0 = image_enc._run(h, g0, end + 1), end + 1
                pooled.append(h.mean(dim=(2, 3)))
            grids.append(h.half())
            stages.append(torch.cat(pooled, 1))
            flips.append(image_enc._run(x.flip(3), 0, STAGE_ENDS[-1] + 1).half())
        tokens, masks, sentences = [], [], []
        captions = [r["caption"] for r in rows]
        for start in range(0, len(captions), 256):
            e = text_enc.encode(captions[start : start + 256])
            t = torch.zeros(len(e.tokens), 32, e.tokens.shape[2])
            m = torch.zeros(len(e.tokens), 32, dtype=torch.bool)
            t[:, : e.tokens.shape[1]], m[:, : e.tokens.shape[1]] = e.tokens, e.mask
            tokens.append(t.half())
            masks.append(m)
            sentences.append(e.pooled)
    return {
        "grid": torch.cat(grids),
        "grid_flip": torch.cat(flips),
        "stages": torch.cat(stages),
        "tokens": torch.cat(tokens),
        "mask": torch.cat(masks),
        "sentence": torch.cat(sentences),
        "owner": torch.tensor([index[r["image"]] for r in rows]),
    }


def _heads() -> dict[str, Any]:
    """Head constructors: (in_dim, out_dim, n_tokens) -> module(x, mask) -> (B, out)."""
    import torch
    from torch import nn

    def masked_mean(x: Any, mask: Any) -> Any:
        if mask is None:
            return x.mean(1)
        m = mask[..., None].float()
        return (x * m).sum(1) / m.sum(1)

    class Linear(nn.Module):
        def __init__(self, din: int, d: int, n: int, mlp: bool = False):
            super().__init__()
            self.lin = nn.Linear(din, d)
            self.mlp = (
                nn.Sequential(nn.Linear(din, 1024), nn.GELU(), nn.Linear(1024, d)) if mlp else None
            )

        def forward(self, x: Any, mask: Any = None) -> Any:
            x = masked_mean(x, mask) if x.dim() == 3 else x
            return self.lin(x) + (self.mlp(x) if self.mlp is not None else 0)

    class GPO(nn.Module):  # Chen et al. 2021 (VSE-infinity), rank weights learned directly
        def __init__(self, din: int, d: int, n: int):
            super().__init__()
            self.proj, self.w = nn.Linear(din, d), nn.Parameter(torch.zeros(n))

        def forward(self, x: Any, mask: Any = None) -> Any:
            k = self.proj(x)
            n = x.shape[1]
            valid = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask
            k = k.masked_fill(~valid[..., None], -1e4).sort(dim=1, descending=True).values
            ranks = torch.arange(n)[None] < valid.sum(1, keepdim=True)
            w = self.w[:n][None].expand(len(x), -1).masked_fill(~ranks, -1e4).softmax(1)
            return (k * w[..., None]).sum(1)

    class Attention(nn.Module):  # one learned query, 4 heads
        def __init__(self, din: int, d: int, n: int):
            super().__init__()
            self.proj, self.q = nn.Linear(din, d), nn.Parameter(torch.randn(1, 1, d) * 0.02)
            self.attn = nn.MultiheadAttention(d, 4, batch_first=True)

        def forward(self, x: Any, mask: Any = None) -> Any:
            k = self.proj(x)
            pad = None if mask is None else ~mask
            return self.attn(self.q.expand(len(x), -1, -1), k, k, key_padding_mask=pad)[0][:, 0]

    return {
        "linear": Linear,
        "mlp": lambda din, d, n: Linear(din, d, n, mlp=True),
        "gpo": GPO,
        "attention": Attention,
    }


# name -> (image input, image head, text input, text head, mirror augmentation + test views)
VARIANTS = {
    "linear heads (real_retrieval's frozen row)": ("pooled", "linear", "sentence", "linear", False),
    "MLP heads": ("pooled", "mlp", "sentence", "mlp", False),
    "image grid, GPO": ("grid", "gpo", "sentence", "linear", False),
    "image grid, attention pooling": ("grid", "attention", "sentence", "linear", False),
    "text tokens, GPO": ("pooled", "linear", "tokens", "gpo", False),
    "text tokens, attention pooling": ("pooled", "linear", "tokens", "attention", False),
    "six stages' pooled outputs": ("stages", "linear", "sentence", "linear", False),
    "mirror augmentation + 2-view test": ("pooled", "linear", "sentence", "linear", True),
}


def _image_input(f: dict[str, Any], kind: str, idx: Any, flip: Any = None) -> Any:
    import torch

    if kind == "stages":
        return f["stages_z"][idx]
    grid = f["grid"][idx]
    if flip is not None:
        grid = torch.where(flip[:, None, None, None], f["grid_flip"][idx], grid)
    tokens = grid.float().flatten(2).transpose(1, 2)  # (B, 49, 1280)
    return tokens.mean(1) if kind == "pooled" else tokens


def _text_input(f: dict[str, Any], kind: str, idx: Any) -> tuple[Any, Any]:
    if kind == "sentence":
        return f["sentence"][idx], None
    return f["tokens"][idx].float(), f["mask"][idx]


def recall(sim: Any, owner: Any) -> dict[str, float]:
    """R@1/R@5 both ways of a (captions, images) similarity matrix."""
    import torch

    n = sim.shape[1]
    t2i = {
        k: (sim.topk(k, 1).indices == owner[:, None]).any(1).float().mean().item() for k in (1, 5)
    }
    top = sim.T.topk(5, 1).indices  # (images, 5) caption indices
    hit = owner[top] == torch.arange(n)[:, None]
    i2t = {k: hit[:, :k].any(1).float().mean().item() for k in (1, 5)}
    return {"i2t R@1": i2t[1], "t2i R@1": t2i[1], "i2t R@5": i2t[5], "t2i R@5": t2i[5]}


def train_variant(tr: dict[str, Any], te: dict[str, Any], spec: tuple, epochs: int) -> tuple:
    """Fit one variant on ``tr``; (embeddings of tr and te, seconds)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    ikind, ihead, tkind, thead, mirror = spec
    heads = _heads()
    din = {"pooled": 1280, "grid": 1280, "stages": sum(STAGE_DIMS)}[ikind]
    ih = heads[ihead](din, 256, tr["grid"].shape[2] * tr["grid"].shape[3])
    th = heads[thead](384, 256, 32)
    scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    opt = torch.optim.AdamW([*ih.parameters(), *th.parameters(), scale], lr=1e-3, weight_decay=0.05)
    n, bs = len(tr["grid"]), min(128, len(tr["grid"]))
    captions_of = [[] for _ in range(n)]
    for ci, owner in enumerate(tr["owner"].tolist()):
        captions_of[owner].append(ci)
    steps = epochs * (n // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(0)
    started = time.process_time()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for b in range(n // bs):
            ii = perm[b * bs : (b + 1) * bs]
            ci = torch.tensor(
                [
                    c[torch.randint(len(c), (1,), generator=g).item()]
                    for c in (captions_of[i] for i in ii.tolist())
                ]
            )
            flip = torch.rand(len(ii), generator=g) < 0.5 if mirror else None
            zi = F.normalize(ih(_image_input(tr, ikind, ii, flip)), dim=-1)
            zt = F.normalize(th(*_text_input(tr, tkind, ci)), dim=-1)
            logits = scale.exp().clamp(max=100) * zi @ zt.T
            y = torch.arange(len(ii))
            loss = (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.process_time() - started

    def embed(f: dict[str, Any]) -> tuple[Any, Any]:
        every = torch.arange(len(f["grid"]))
        with torch.no_grad():
            zi = F.normalize(ih(_image_input(f, ikind, every)), dim=-1)
            if mirror:
                flipped = ih(
                    _image_input(f, ikind, every, torch.ones(len(every), dtype=torch.bool))
                )
                zi = F.normalize(zi + F.normalize(flipped, dim=-1), dim=-1)
            zt = F.normalize(th(*_text_input(f, tkind, torch.arange(len(f["owner"])))), dim=-1)
        return zi, zt

    return embed(tr), embed(te), seconds


def knn_transfer(tr: dict[str, Any], te: dict[str, Any], k: int = 10, beta: float = 10.0) -> Any:
    """(captions, images) similarity: a test photo = the softmax-weighted mean caption (MiniLM)
    of its k nearest training photos (cosine of the pooled image features)."""
    import torch
    import torch.nn.functional as F

    def pooled(f: dict[str, Any]) -> Any:
        return F.normalize(f["grid"].float().mean(dim=(2, 3)), dim=-1)

    sent_tr = F.normalize(tr["sentence"], dim=-1)
    mean_caption = torch.zeros(len(tr["grid"]), sent_tr.shape[1]).index_add_(
        0, tr["owner"], sent_tr
    )
    mean_caption = F.normalize(mean_caption, dim=-1)
    v, ix = (pooled(te) @ pooled(tr).T).topk(min(k, len(tr["grid"])), dim=1)
    photo = F.normalize((torch.softmax(beta * v, 1)[..., None] * mean_caption[ix]).sum(1), dim=-1)
    return F.normalize(te["sentence"], dim=-1) @ photo.T


def csls(train_emb: tuple, test_emb: tuple, k: int = 50, lam: float = 0.5) -> Any:
    """Linear heads' similarity minus lam x each side's mean similarity to its k nearest
    training items of the other modality (a hub correction that needs no test statistics)."""
    zi_tr, zt_tr = train_emb
    zi, zt = test_emb
    r_img = (zi @ zt_tr.T).topk(min(k, len(zt_tr)), dim=1).values.mean(1)
    r_cap = (zt @ zi_tr.T).topk(min(k, len(zi_tr)), dim=1).values.mean(1)
    return zt @ zi.T - lam * r_img[None, :] - lam * r_cap[:, None]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    started = time.perf_counter()
    args = c.parser(NAME, __doc__).parse_args(argv)
    test_images, epochs = c.pick(args, (20, 2), (1000, 10), (1000, 20))
    with c.workdir(args, NAME) as work:
        src = DATA
        if args.smoke:  # 60 photos of the collection
            rows = [json.loads(x) for x in (DATA / "captions.jsonl").read_text().splitlines()]
            keep = sorted({r["image"] for r in rows})[:60]
            src = work / "smoke-src"
            (src / "images").mkdir(parents=True, exist_ok=True)
            for p in keep:
                (src / p).write_bytes((DATA / p).read_bytes())
            (src / "captions.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rows if r["image"] in set(keep))
            )
        train, test = split_collection(src, work, test_images)
        t0 = time.process_time()
        tr, te = extract(train, 224), extract(test, 224)
        extract_s = time.process_time() - t0
    mu, sd = tr["stages"].mean(0), tr["stages"].std(0) + 1e-4  # standardised: scales differ
    tr["stages_z"], te["stages_z"] = (tr["stages"] - mu) / sd, (te["stages"] - mu) / sd
    results: dict[str, dict[str, float]] = {}
    figures = []
    linear_emb = None
    for name, spec in VARIANTS.items():
        train_emb, test_emb, seconds = train_variant(tr, te, spec, epochs)
        results[name] = {**recall(test_emb[1] @ test_emb[0].T, te["owner"]), "train CPU s": seconds}
        if linear_emb is None:
            linear_emb = (train_emb, test_emb)
        print(f"  {name}: {json.dumps(results[name])}", flush=True)
    results["kNN caption transfer (k=10)"] = recall(knn_transfer(tr, te), te["owner"])
    results["linear heads + CSLS hub correction"] = recall(csls(*linear_emb), te["owner"])
    base = results[next(iter(VARIANTS))]
    for name, r in results.items():
        for way in ("i2t R@1", "t2i R@1"):
            figures.append(
                c.figure(
                    f"{name}: {way}",
                    round(r[way], 4),
                    "",
                    note=f"{r[way] - base[way]:+.3f} vs linear",
                )
            )
    conditions = {
        "data": f"{DATA.name}: {len(tr['grid'])} training photos, {len(te['grid'])} held-out "
        f"({len(te['owner'])} captions; real_retrieval's split)",
        "features": "EfficientNet-Lite0 at 224 px (shard's centre square) + mirror; MiniLM, 32 tokens; "
        f"extracted once in {extract_s:.0f} CPU s",
        "training": f"{epochs} epochs, batch 128, AdamW lr 1e-3 one-cycle, wd 0.05, embed 256, seed 0",
        "torch_threads": torch.get_num_threads(),
    }
    return c.finish(NAME, args, argv, figures, conditions, {"results": results}, started)


if __name__ == "__main__":
    main(sys.argv[1:])

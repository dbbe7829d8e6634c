"""Write the seed inputs of each fuzz target into tests/fuzz/corpus/TARGET/seed-* (small,
valid examples the fuzzer mutates). Run once; the files are committed.

    python tests/fuzz/make_seeds.py
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import iared
from iared.backbones.checkpoint import save_safetensors

CORPUS = Path(__file__).resolve().parent / "corpus"


def write(target: str, name: str, data: bytes) -> None:
    (CORPUS / target).mkdir(parents=True, exist_ok=True)
    (CORPUS / target / f"seed-{name}").write_bytes(data)


def main() -> None:
    for i, text in enumerate(["original,ats@0.7,random@keep_ratio=0.5", "ats@K=48+stages=2,3",
                              "iared@0.5,tome@8,evit@0.7,topk@rho=0.6+min_k=4", "ats@3-11", "ats@compound=true"]):
        write("methods", str(i), text.encode())
    for i, text in enumerate(["imagefolder:/data", "cluttered-digits", "cifar10:x.zip", "videofolder:a:b", "MNIST:"]):
        write("data_spec", str(i), text.encode())
    write("labels_tsv", "0", b"file\tclass_index\nimages/0.png\t3\nimages/1.png\t998\n")
    write("labels_tsv", "1", b"images/0.png\tcat\nimages/1.png\tdog\n")

    torch.manual_seed(0)
    model = iared.create_model("vit_custom", img_size=8, patch_size=4, in_chans=3, embed_dim=8, depth=1,
                               num_heads=2, num_classes=3)
    tmp = CORPUS / "_tmp.safetensors"
    iared.save_model(model, tmp, arch="vit_custom")
    write("safetensors_file", "iared", tmp.read_bytes())
    save_safetensors(model.state_dict(), tmp, metadata={"mean": "0.5,0.5,0.5", "crop_pct": "0.9"})
    write("safetensors_file", "timm", tmp.read_bytes())
    tmp.unlink()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict()}, buf)
    write("pth_file", "wrapped", buf.getvalue())

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8))
    for fmt, kw in (("PNG", {}), ("JPEG", {}), ("GIF", {}), ("WEBP", {}), ("BMP", {}), ("TIFF", {})):
        buf = io.BytesIO()
        rgb.save(buf, fmt, **kw)
        write("image", fmt.lower(), buf.getvalue())

    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for t in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 60 * t, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    write("video", "mp4", buf.getvalue())


if __name__ == "__main__":
    main()

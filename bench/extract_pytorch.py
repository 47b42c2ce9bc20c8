#!/usr/bin/env python3
"""An independent PyTorch implementation of the bottom-up-attention detector in caffe mode
(what `demovlp extract` runs), for side-by-side timing with `demovlp bench extract`.

Written from the fixture README's rules (testdata/extract, `../shared/fixtures/extract/README.md`),
in plain torch + numpy: no detectron2, no torchvision (RoIPool and NMS are written here with
tensor ops; see the notes at those functions).

  python3 bench/extract_pytorch.py --check            # against testdata/extract: PASS/FAIL lines, exit 1 on failure
  python3 bench/extract_pytorch.py --bench --json     # seconds per frame at the published sizes

`--bench` builds the published network's shapes with seeded random weights and a synthetic
480x640 frame (the same formula as `demovlp bench extract`), with the RPN's NMS switched off
so that res5 runs on all 300 proposals, as `demovlp bench extract` does.
"""

import argparse
import json
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

MEAN = np.array([102.9801, 115.9465, 122.7717])
EPS = 1e-5
HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------- blob

def taps(src, dst, s, reset_border):
    d = np.arange(dst, dtype=np.float64)
    f = ((d + 0.5) * (1.0 / s) - 0.5).astype(np.float32)
    fl = np.floor(f)
    a = (f - fl).astype(np.float32)
    x0 = fl.astype(np.int64)
    last = src - 1
    if reset_border:
        a = np.where((x0 < 0) | (x0 >= last), np.float32(0), a).astype(np.float32)
        x0 = np.clip(x0, 0, last)
        x1 = np.minimum(x0 + 1, last)
    else:
        x1 = np.clip(x0 + 1, 0, last)
        x0 = np.clip(x0, 0, last)
    return x0, x1, a


def blob_of(img, target=600, max_size=1000):
    h, w = img.shape[:2]
    s = target / min(h, w)
    if np.round(s * max(h, w)) > max_size:
        s = max_size / max(h, w)
    im = img.astype(np.float32)
    im -= MEAN
    dw, dh = int(np.round(w * s)), int(np.round(h * s))
    x0, x1, a = taps(w, dw, s, True)
    y0, y1, b = taps(h, dh, s, False)
    one = np.float32(1)
    t = im[:, x0] * (one - a)[None, :, None] + im[:, x1] * a[None, :, None]
    out = t[y0] * (one - b)[:, None, None] + t[y1] * b[:, None, None]
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))[None], s


# ---------------------------------------------------------------- network

class Detector:
    def __init__(self, sd, rpn_nms=0.7, pre_nms=6000, post_nms=300):
        self.sd = sd
        self.rpn_nms, self.pre_nms, self.post_nms = rpn_nms, pre_nms, post_nms
        self.blocks = {}
        for p in ["backbone.res2", "backbone.res3", "backbone.res4", "roi_heads.res5"]:
            n = 0
            while f"{p}.{n}.conv1.weight" in sd:
                n += 1
            self.blocks[p] = n
        self.cells = sd["proposal_generator.anchor_generator.cell_anchors.0"]

    def conv_bn(self, x, name, stride=1, pad=0, dilation=1, relu=True):
        sd = self.sd
        y = F.conv2d(x, sd[f"{name}.weight"], None, stride, pad, dilation)
        scale = sd[f"{name}.norm.weight"] * (sd[f"{name}.norm.running_var"] + EPS).rsqrt()
        bias = sd[f"{name}.norm.bias"] - sd[f"{name}.norm.running_mean"] * scale
        y = y * scale[None, :, None, None] + bias[None, :, None, None]
        return F.relu(y) if relu else y

    def block(self, x, p, stride, dilation):
        y = self.conv_bn(x, f"{p}.conv1", stride)
        y = self.conv_bn(y, f"{p}.conv2", 1, dilation, dilation)
        y = self.conv_bn(y, f"{p}.conv3", relu=False)
        sc = self.conv_bn(x, f"{p}.shortcut", stride, relu=False) if f"{p}.shortcut.weight" in self.sd else x
        return F.relu(y + sc)

    def backbone(self, blob):
        x = self.conv_bn(blob, "backbone.stem.conv1", 2, 3)
        x = F.max_pool2d(x, 3, 2, 0, ceil_mode=True)
        for s, name in enumerate(["res2", "res3", "res4"]):
            for i in range(self.blocks[f"backbone.{name}"]):
                x = self.block(x, f"backbone.{name}.{i}", 2 if (i == 0 and s > 0) else 1, 1)
        return x

    def proposals(self, res4, bh, bw, s):
        sd = self.sd
        h = "proposal_generator.rpn_head"
        t = F.relu(F.conv2d(res4, sd[f"{h}.conv.weight"], sd[f"{h}.conv.bias"], 1, 1))
        obj = F.conv2d(t, sd[f"{h}.objectness_logits.weight"], sd[f"{h}.objectness_logits.bias"])[0]
        dl = F.conv2d(t, sd[f"{h}.anchor_deltas.weight"], sd[f"{h}.anchor_deltas.bias"])[0]
        A = self.cells.shape[0]
        H, W = obj.shape[1:]
        pair = obj.reshape(2, A, H, W).permute(2, 3, 1, 0).reshape(-1, 2)
        fg = torch.softmax(pair, dim=1)[:, 1]
        d = dl.reshape(A, 4, H, W).permute(2, 3, 0, 1).reshape(-1, 4)
        sy, sx = torch.meshgrid(torch.arange(H, dtype=torch.float32) * 16, torch.arange(W, dtype=torch.float32) * 16, indexing="ij")
        shifts = torch.stack([sx, sy, sx, sy], -1).reshape(-1, 1, 4)
        anchors = (shifts + self.cells[None]).reshape(-1, 4)
        wa = anchors[:, 2] - anchors[:, 0] + 1
        ha = anchors[:, 3] - anchors[:, 1] + 1
        cx = anchors[:, 0] + 0.5 * wa
        cy = anchors[:, 1] + 0.5 * ha
        clamp = float(np.log(1000.0 / 16))
        dw = torch.clamp(d[:, 2], max=clamp)
        dh = torch.clamp(d[:, 3], max=clamp)
        pcx = d[:, 0] * wa + cx
        pcy = d[:, 1] * ha + cy
        pw = torch.exp(dw) * wa
        ph = torch.exp(dh) * ha
        boxes = torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], 1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, bw - 1)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, bh - 1)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        m = torch.tensor(16 * s, dtype=torch.float32)
        keep &= (boxes[:, 2] - boxes[:, 0] + 1 > m) & (boxes[:, 3] - boxes[:, 1] + 1 > m)
        idx = torch.nonzero(keep)[:, 0]
        sc, order = torch.sort(fg[idx], descending=True, stable=True)
        order = order[: self.pre_nms]
        sc = sc[: self.pre_nms]
        top_idx = idx[order]
        top_boxes = boxes[top_idx]
        kept = nms(top_boxes, sc, self.rpn_nms)[: self.post_nms]
        return fg, top_idx, top_boxes[kept], sc[kept], kept

    def res5(self, pooled):
        x = pooled
        for i in range(self.blocks["roi_heads.res5"]):
            x = self.block(x, f"roi_heads.res5.{i}", 1, 2)
        return x.mean(dim=(2, 3))

    def heads(self, x):
        sd = self.sd
        p = "roi_heads.box_predictor"
        logits = F.linear(x, sd[f"{p}.cls_score.weight"], sd[f"{p}.cls_score.bias"])
        probs = torch.softmax(logits, 1)
        label = logits.argmax(1)
        cat = torch.cat([x, sd[f"{p}.cls_embed.weight"][label]], 1)
        hid = F.relu(F.linear(cat, sd[f"{p}.attr_linear1.weight"], sd[f"{p}.attr_linear1.bias"]))
        attr = torch.softmax(F.linear(hid, sd[f"{p}.attr_linear2.weight"], sd[f"{p}.attr_linear2.bias"]), 1)
        return probs, attr, label

    def run(self, img):
        blob, s = blob_of(img)
        res4 = self.backbone(blob)
        fg, top_idx, props, scores, kept = self.proposals(res4, blob.shape[2], blob.shape[3], s)
        x = self.res5(roi_pool(res4[0], props))
        probs, attr, label = self.heads(x)
        dets = props / s
        sel, max_conf = select(dets, probs)
        oc, oi = probs[sel, 1:].max(1)
        ac, ai = attr[sel, 1:].max(1)
        return dict(blob=blob, res4=res4, fg=fg, top_idx=top_idx, kept=kept, props=props, x=x, probs=probs, attr=attr,
                    label=label, dets=dets, max_conf=max_conf, sel=sel, out_x=x[sel], bbox=dets[sel], objects_id=oi,
                    objects_conf=oc, attrs_id=ai, attrs_conf=ac)


def iou_matrix(b):
    area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    xx1 = torch.maximum(b[:, None, 0], b[None, :, 0])
    yy1 = torch.maximum(b[:, None, 1], b[None, :, 1])
    xx2 = torch.minimum(b[:, None, 2], b[None, :, 2])
    yy2 = torch.minimum(b[:, None, 3], b[None, :, 3])
    inter = (xx2 - xx1 + 1).clamp(min=0) * (yy2 - yy1 + 1).clamp(min=0)
    return inter / (area[:, None] + area[None, :] - inter)


def nms(boxes, scores, thresh):
    """Caffe NMS: visit by descending score (stable), suppress IoU >= thresh; kept indices
    ascending. A Python loop over kept boxes, each suppressing with one vector op."""
    n = boxes.shape[0]
    order = torch.sort(scores, descending=True, stable=True)[1]
    b = boxes[order]
    area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    sup = torch.zeros(n, dtype=torch.bool)
    t = torch.tensor(thresh, dtype=torch.float32)
    for i in range(n):
        if sup[i]:
            continue
        r = b[i + 1:]
        w = (torch.minimum(b[i, 2], r[:, 2]) - torch.maximum(b[i, 0], r[:, 0]) + 1).clamp(min=0)
        h = (torch.minimum(b[i, 3], r[:, 3]) - torch.maximum(b[i, 1], r[:, 1]) + 1).clamp(min=0)
        inter = w * h
        sup[i + 1:] |= inter / (area[i] + area[i + 1:] - inter) >= t
    return torch.sort(order[~sup])[0]


def select(dets, probs, min_boxes=10, max_boxes=100, conf=0.2, thresh=0.3):
    """Per-class Caffe NMS 0.3 (the pairwise test computed once), then the box selection."""
    p, k = probs.shape
    M = (iou_matrix(dets) >= torch.tensor(thresh, dtype=torch.float32)).numpy()
    pr = probs.numpy()
    max_conf = np.zeros(p, dtype=np.float32)
    for c in range(1, k):
        sc = pr[:, c]
        order = np.argsort(-sc, kind="stable")
        rank = np.empty(p, dtype=np.int64)
        rank[order] = np.arange(p)
        sup = np.zeros(p, dtype=bool)
        for i in order:
            if not sup[i]:
                sup |= M[i] & (rank > rank[i])
        keep = ~sup
        max_conf[keep] = np.where(sc[keep] > max_conf[keep], sc[keep], max_conf[keep])
    over = np.nonzero(max_conf >= np.float32(conf))[0]
    if len(over) < min_boxes:
        over = np.argsort(max_conf, kind="stable")[::-1][:min_boxes]
    elif len(over) > max_boxes:
        over = np.argsort(max_conf, kind="stable")[::-1][:max_boxes]
    return torch.from_numpy(np.ascontiguousarray(over)), max_conf


def roi_pool(fm, rois, out=14, scale=1.0 / 16):
    """torchvision's RoIPool (bin edges in f32), one RoI at a time: the max over each bin row,
    then over each bin; empty bins give 0."""
    C, H, W = fm.shape
    res = torch.zeros(rois.shape[0], C, out, out)
    r = torch.round(rois * torch.tensor(scale, dtype=torch.float32)).to(torch.int64).tolist()
    for n, (x1, y1, x2, y2) in enumerate(r):
        rw, rh = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
        bw = np.float32(rw) / np.float32(out)
        bh = np.float32(rh) / np.float32(out)
        for ph in range(out):
            hs = min(max(int(np.floor(np.float32(ph) * bh)) + y1, 0), H)
            he = min(max(int(np.ceil(np.float32(ph + 1) * bh)) + y1, 0), H)
            if he <= hs:
                continue
            row = fm[:, hs:he].amax(1)
            for pw in range(out):
                ws = min(max(int(np.floor(np.float32(pw) * bw)) + x1, 0), W)
                we = min(max(int(np.ceil(np.float32(pw + 1) * bw)) + x1, 0), W)
                if we > ws:
                    res[n, :, ph, pw] = row[:, ws:we].amax(1)
    return res


# ---------------------------------------------------------------- modes

def check():
    from safetensors import safe_open
    root = os.path.join(HERE, "..", "testdata", "extract")
    sd = torch.load(os.path.join(root, "bua_tiny.pth"), map_location="cpu", weights_only=True)
    sd = sd.get("model", sd)
    det = Detector(sd)
    ok = True

    def report(name, good, detail=""):
        nonlocal ok
        ok &= bool(good)
        print(f"{'PASS' if good else 'FAIL'} {name} {detail}")

    with safe_open(os.path.join(root, "extract_tiny.safetensors"), "pt") as f:
        for i in range(3):
            g = lambda n: f.get_tensor(f"frame{i}.{n}")
            r = det.run(g("image_bgr").numpy())
            rows, cols = g("blob_rows"), g("blob_cols")
            sub = r["blob"][0][:, rows][:, :, cols]
            report(f"frame{i} blob bit-exact", torch.equal(sub, g("blob_sub")))
            ref = g("res4")
            e = (r["res4"] - ref).abs().max().item() / ref.abs().max().item()
            report(f"frame{i} res4", e <= 1e-5, f"rel {e:.2e}")
            report(f"frame{i} rpn_fg_prob", (r["fg"] - g("rpn_fg_prob")).abs().max().item() <= 1e-5)
            mine = set(r["top_idx"][r["kept"]].tolist())
            theirs = set(g("rpn_topk_index")[g("rpn_nms_keep")].tolist())
            report(f"frame{i} proposal set", mine == theirs)
            x = det.res5(roi_pool(ref[0], g("proposals")))
            e = (x - g("x")).abs().max().item() / g("x").abs().max().item()
            report(f"frame{i} x", e <= 1e-5, f"rel {e:.2e}")
            report(f"frame{i} selected", r["sel"].tolist() == g("selected").tolist())
            report(f"frame{i} objects_id", r["objects_id"].tolist() == g("npz.objects_id").tolist())
            report(f"frame{i} attrs_id", r["attrs_id"].tolist() == g("npz.attrs_id").tolist())
    return ok


def published_random(seed=1):
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def normal(name, shape, std):
        sd[name] = torch.randn(*shape, generator=g) * std

    def conv_bn(name, cout, cin, k, gamma):
        normal(f"{name}.weight", (cout, cin, k, k), (2.0 / (cin * k * k)) ** 0.5)
        sd[f"{name}.norm.weight"] = torch.full((cout,), gamma)
        normal(f"{name}.norm.bias", (cout,), 0.1)
        sd[f"{name}.norm.running_mean"] = torch.zeros(cout)
        sd[f"{name}.norm.running_var"] = torch.ones(cout)

    def stage(prefix, n, cin, b, out):
        for i in range(n):
            inw = cin if i == 0 else out
            conv_bn(f"{prefix}.{i}.conv1", b, inw, 1, 1.0)
            conv_bn(f"{prefix}.{i}.conv2", b, b, 3, 1.0)
            conv_bn(f"{prefix}.{i}.conv3", out, b, 1, 0.2)
            if inw != out:
                conv_bn(f"{prefix}.{i}.shortcut", out, inw, 1, 1.0)

    conv_bn("backbone.stem.conv1", 64, 3, 7, 1.0)
    cin = 64
    for name, n, b, out in [("res2", 3, 64, 256), ("res3", 4, 128, 512), ("res4", 23, 256, 1024)]:
        stage(f"backbone.{name}", n, cin, b, out)
        cin = out
    cells = []
    for ratio in (0.5, 1.0, 2.0):
        ws = np.round(np.sqrt(256 / ratio))
        hs = np.round(ws * ratio)
        for sc in (4, 8, 16, 32):
            w, h = ws * sc, hs * sc
            cells.append([7.5 - 0.5 * (w - 1), 7.5 - 0.5 * (h - 1), 7.5 + 0.5 * (w - 1), 7.5 + 0.5 * (h - 1)])
    sd["proposal_generator.anchor_generator.cell_anchors.0"] = torch.tensor(cells, dtype=torch.float32)
    h = "proposal_generator.rpn_head"
    normal(f"{h}.conv.weight", (512, 1024, 3, 3), (2.0 / 9216) ** 0.5)
    sd[f"{h}.conv.bias"] = torch.zeros(512)
    normal(f"{h}.objectness_logits.weight", (24, 512, 1, 1), (1 / 512) ** 0.5)
    sd[f"{h}.objectness_logits.bias"] = torch.zeros(24)
    normal(f"{h}.anchor_deltas.weight", (48, 512, 1, 1), 0.1 / 512 ** 0.5)
    sd[f"{h}.anchor_deltas.bias"] = torch.zeros(48)
    stage("roi_heads.res5", 3, 1024, 512, 2048)
    p = "roi_heads.box_predictor"
    normal(f"{p}.cls_score.weight", (1601, 2048), (1 / 2048) ** 0.5)
    normal(f"{p}.cls_score.bias", (1601,), 0.1)
    normal(f"{p}.cls_embed.weight", (1601, 256), 1.0)
    normal(f"{p}.attr_linear1.weight", (512, 2304), (1 / 2304) ** 0.5)
    normal(f"{p}.attr_linear1.bias", (512,), 0.1)
    normal(f"{p}.attr_linear2.weight", (401, 512), (1 / 512) ** 0.5)
    normal(f"{p}.attr_linear2.bias", (401,), 0.1)
    return sd


def synthetic_frame(h, w):
    i = np.arange(h * w * 3)
    p, c = i // 3, i % 3
    y, x = p // w, p % w
    return ((x * 255 // w + y * 128 // h + c * 40 + ((x // 32 + y // 32) % 2) * 60) % 256).astype(np.uint8).reshape(h, w, 3)


def bench(runs, h, w):
    det = Detector(published_random(), rpn_nms=1.01)
    frame = synthetic_frame(h, w)
    times = []
    props = 0
    with torch.inference_mode():
        for i in range(runs + 1):
            t0 = time.perf_counter()
            r = det.run(frame)
            dt = time.perf_counter() - t0
            props = r["props"].shape[0]
            print(f"run {i}{' (warm-up)' if i == 0 else ''}: {dt:.3f}s, {props} proposals", file=sys.stderr)
            if i > 0:
                times.append(dt)
    return {"median_s": float(np.median(times)), "min_s": min(times), "max_s": max(times), "runs": runs, "proposals": props,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.check:
        sys.exit(0 if check() else 1)
    if a.bench:
        r = bench(a.runs, a.height, a.width)
        print(json.dumps(r) if a.json else r)
        return
    ap.print_help()


if __name__ == "__main__":
    main()

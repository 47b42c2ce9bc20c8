#!/usr/bin/env python3
"""PyTorch baseline for DemoVLP: the same model, losses and optimiser as the Rust crates,
written directly in torch (no transformers / timm / einops), so both can be timed side by side.

  --check            reproduce the fixtures in testdata/ (PASS/FAIL per item, exit 1 on failure)
  --bench            one training step (forward + both losses + backward + AdamW) at published size
  --bench-eval-sims  the published blocked local-similarity evaluation over an N x N set
  --bench-embed      inference throughput of the two towers (texts/s, clips/s)

Every --bench* mode ends with one JSON line when --json is given.
Behaviour follows ../shared/reference/SPEC.md (sections 5-8); see bench/README.md.
"""
import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# what the interpreter + torch's shared libraries hold before any work (the PyPI wheel loads its
# CUDA libraries even on a CPU-only machine), reported next to the peak
IMPORT_RSS_MB = None  # set in main(), once peak_rss_mb is defined

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTDATA = os.path.join(ROOT, "testdata")
FEAT = 2048  # region feature width; the remaining 6 input values are the box features


# ----------------------------------------------------------------------------------------------
# Configuration


class Config:
    """Model sizes; the field names follow the fixtures' metadata `config`."""

    def __init__(self, F=8, R=30, dim=768, depth=12, heads=12, tdim=768, tlayers=6, theads=12,
                 out=256, vocab=30522, maxpos=512, **_):
        self.F, self.R = F, R  # frames (temporal_embed rows) and regions per frame
        self.dim, self.depth, self.heads = dim, depth, heads  # video tower
        self.tdim, self.tlayers, self.theads = tdim, tlayers, theads  # DistilBERT text tower
        self.out, self.vocab, self.maxpos = out, vocab, maxpos


PUBLISHED = dict(F=8, R=30, dim=768, depth=12, heads=12, tdim=768, tlayers=6, theads=12,
                 out=256, vocab=30522, maxpos=512)


def param_shapes(c):
    """Every parameter, named as in the published model's state_dict."""
    s = {}
    D, T = c.dim, c.tdim
    s["text_model.embeddings.word_embeddings.weight"] = (c.vocab, T)
    s["text_model.embeddings.position_embeddings.weight"] = (c.maxpos, T)
    s["text_model.embeddings.LayerNorm.weight"] = (T,)
    s["text_model.embeddings.LayerNorm.bias"] = (T,)
    for i in range(c.tlayers):
        p = f"text_model.transformer.layer.{i}."
        for n in ("q_lin", "k_lin", "v_lin", "out_lin"):
            s[p + f"attention.{n}.weight"] = (T, T)
            s[p + f"attention.{n}.bias"] = (T,)
        s[p + "sa_layer_norm.weight"] = (T,)
        s[p + "sa_layer_norm.bias"] = (T,)
        s[p + "ffn.lin1.weight"] = (4 * T, T)
        s[p + "ffn.lin1.bias"] = (4 * T,)
        s[p + "ffn.lin2.weight"] = (T, 4 * T)
        s[p + "ffn.lin2.bias"] = (T,)
        s[p + "output_layer_norm.weight"] = (T,)
        s[p + "output_layer_norm.bias"] = (T,)
    s["txt_proj.1.weight"] = (c.out, T)
    s["txt_proj.1.bias"] = (c.out,)
    o = "object_model."
    s[o + "cls_token"] = (1, 1, D)
    s[o + "custom_pos_embed"] = (1, c.R + 1, D)
    s[o + "temporal_embed"] = (1, c.F, D)
    s[o + "object_embedding.weight"] = (D, FEAT)
    s[o + "object_embedding.bias"] = (D,)
    s[o + "pos_embedding.weight"] = (D, 6)
    s[o + "pos_embedding.bias"] = (D,)
    for i in range(c.depth):
        p = f"{o}blocks.{i}."
        for n in ("norm1", "norm2", "norm3"):  # norm3 exists in checkpoints but is unused
            s[p + n + ".weight"] = (D,)
            s[p + n + ".bias"] = (D,)
        s[p + "attn.qkv.weight"] = (3 * D, D)
        s[p + "attn.qkv.bias"] = (3 * D,)
        s[p + "attn.proj.weight"] = (D, D)
        s[p + "attn.proj.bias"] = (D,)
        s[p + "mlp.fc1.weight"] = (4 * D, D)
        s[p + "mlp.fc1.bias"] = (4 * D,)
        s[p + "mlp.fc2.weight"] = (D, 4 * D)
        s[p + "mlp.fc2.bias"] = (D,)
    s[o + "norm.weight"] = (D,)  # final LayerNorm: present, never applied
    s[o + "norm.bias"] = (D,)
    s[o + "proj.weight"] = (c.out, D)
    return s


def random_params(c, seed=0):
    """Random init for timing: N(0, 0.02) weights, zero biases, unit LayerNorm gains."""
    g = torch.Generator().manual_seed(seed)
    ps = {}
    for name, shape in param_shapes(c).items():
        if name.endswith(".bias"):
            t = torch.zeros(shape)
        elif "norm" in name.lower() and name.endswith(".weight"):
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=g) * 0.02
        ps[name] = t.requires_grad_(True)
    return ps


# ----------------------------------------------------------------------------------------------
# Text tower: DistilBERT (post-LayerNorm, eps 1e-12, GELU-erf), then ReLU -> Linear on every token


def text_hidden(p, c, input_ids, attention_mask, dropout=0.0):
    """DistilBERT last_hidden_state [B, L, tdim]. `dropout` > 0 applies Hugging Face DistilBERT's
    training-mode dropout (embeddings, attention weights, FFN output), as the published trainer does."""
    drop = (lambda t: F.dropout(t, dropout, True)) if dropout > 0 else (lambda t: t)
    B, L = input_ids.shape
    T, h = c.tdim, c.theads
    dh = T // h
    e = "text_model.embeddings."
    # padding_idx=0 as in Hugging Face: the [PAD] row is used but never receives a gradient
    x = F.embedding(input_ids, p[e + "word_embeddings.weight"], padding_idx=0)
    x = x + p[e + "position_embeddings.weight"][:L]
    x = drop(F.layer_norm(x, (T,), p[e + "LayerNorm.weight"], p[e + "LayerNorm.bias"], 1e-12))
    # padded keys get the most negative float, as Hugging Face DistilBERT does
    pad = (attention_mask == 0)[:, None, None, :]
    for i in range(c.tlayers):
        q_ = f"text_model.transformer.layer.{i}."

        def lin(n, t):
            return F.linear(t, p[q_ + n + ".weight"], p[q_ + n + ".bias"])

        def heads(t):
            return t.view(B, L, h, dh).transpose(1, 2)

        q = heads(lin("attention.q_lin", x)) / math.sqrt(dh)
        k = heads(lin("attention.k_lin", x))
        v = heads(lin("attention.v_lin", x))
        s = (q @ k.transpose(-1, -2)).masked_fill(pad, torch.finfo(x.dtype).min)
        ctx = (drop(s.softmax(-1)) @ v).transpose(1, 2).reshape(B, L, T)
        x = F.layer_norm(lin("attention.out_lin", ctx) + x, (T,),
                         p[q_ + "sa_layer_norm.weight"], p[q_ + "sa_layer_norm.bias"], 1e-12)
        y = drop(lin("ffn.lin2", F.gelu(lin("ffn.lin1", x))))
        x = F.layer_norm(y + x, (T,), p[q_ + "output_layer_norm.weight"],
                         p[q_ + "output_layer_norm.bias"], 1e-12)
    return x


def text_tower(p, c, input_ids, attention_mask, dropout=0.0):
    x = text_hidden(p, c, input_ids, attention_mask, dropout)
    t = F.linear(F.relu(x), p["txt_proj.1.weight"], p["txt_proj.1.bias"])
    return t[:, 0], t[:, 1:]  # global (CLS), local (the L-1 following tokens, padding included)


# ----------------------------------------------------------------------------------------------
# Video tower: object transformer, pre-LayerNorm (eps 1e-6), per-frame attention + CLS


def video_tower(p, c, obj, obj_mask):
    B, Fr, R, _ = obj.shape
    D, h = c.dim, c.heads
    dh = D // h
    o = "object_model."
    x = F.linear(obj[..., :FEAT], p[o + "object_embedding.weight"], p[o + "object_embedding.bias"])
    x = x + F.linear(obj[..., FEAT:], p[o + "pos_embedding.weight"], p[o + "pos_embedding.bias"])
    x = x.reshape(B, Fr * R, D)
    x = torch.cat([p[o + "cls_token"].expand(B, 1, D), x], 1)
    # CLS gets custom_pos_embed[0]; every region of frame f gets temporal_embed[f]
    pos = torch.cat([p[o + "custom_pos_embed"][:, :1],
                     p[o + "temporal_embed"][:, :Fr].repeat_interleave(R, 1)], 1)
    x = x + pos
    # additive key mask: 0 for CLS and real regions, -100 for padding
    m = (torch.cat([torch.ones(B, 1, dtype=x.dtype, device=x.device), obj_mask.reshape(B, -1).to(x.dtype)], 1) - 1) * 100
    m_cls = m[:, None, None, :]  # [B,1,1,N] for the CLS query over all tokens
    # per-frame keys are [CLS, regions of frame f]: mask [B,1,F,1,1+R]
    m_frame = torch.cat([m[:, :1, None].expand(B, Fr, 1), m[:, 1:].view(B, Fr, R)], 2)[:, None, :, None, :]
    N = 1 + Fr * R
    for i in range(c.depth):
        b = f"{o}blocks.{i}."
        y = F.layer_norm(x, (D,), p[b + "norm1.weight"], p[b + "norm1.bias"], 1e-6)
        qkv = F.linear(y, p[b + "attn.qkv.weight"], p[b + "attn.qkv.bias"])
        q, k, v = qkv.view(B, N, 3, h, dh).permute(2, 0, 3, 1, 4)  # each [B,h,N,dh]
        q = q * dh ** -0.5
        cls_out = ((q[:, :, :1] @ k.transpose(-1, -2)) + m_cls).softmax(-1) @ v  # [B,h,1,dh]
        kf = torch.cat([k[:, :, None, :1].expand(B, h, Fr, 1, dh), k[:, :, 1:].view(B, h, Fr, R, dh)], 3)
        vf = torch.cat([v[:, :, None, :1].expand(B, h, Fr, 1, dh), v[:, :, 1:].view(B, h, Fr, R, dh)], 3)
        qf = q[:, :, 1:].view(B, h, Fr, R, dh)
        reg_out = ((qf @ kf.transpose(-1, -2)) + m_frame).softmax(-1) @ vf  # [B,h,F,R,dh]
        a = torch.cat([cls_out, reg_out.reshape(B, h, Fr * R, dh)], 2).transpose(1, 2).reshape(B, N, D)
        x = x + F.linear(a, p[b + "attn.proj.weight"], p[b + "attn.proj.bias"])
        y = F.layer_norm(x, (D,), p[b + "norm2.weight"], p[b + "norm2.bias"], 1e-6)
        y = F.linear(F.gelu(F.linear(y, p[b + "mlp.fc1.weight"], p[b + "mlp.fc1.bias"])),
                     p[b + "mlp.fc2.weight"], p[b + "mlp.fc2.bias"])
        x = x + y
    out = F.linear(x, p[o + "proj.weight"])  # no final LayerNorm (published quirk), no bias
    return out[:, 0], out[:, 1:], m[:, 1:]


# ----------------------------------------------------------------------------------------------
# Losses (SPEC section 6), materialising the (B, B, words, regions) tensors as the published code does


def global_sim(text, video):
    """cos(text_t, video_v) with each norm clamped below at 1e-8; rows = texts."""
    a = text / text.norm(dim=1, keepdim=True).clamp(min=1e-8)
    b = video / video.norm(dim=1, keepdim=True).clamp(min=1e-8)
    return a @ b.t()


def global_loss(sim, tau=0.05):
    i = F.log_softmax(sim / tau, 1).diagonal().mean()
    j = F.log_softmax(sim.t() / tau, 1).diagonal().mean()
    return -i - j


def attend(Q, C, mq, mc, lam=20.0):
    """Q [bq,Lq,d], C [bc,Lc,d], additive masks mq [bq,Lq], mc [bc,Lc] -> W [bc,bq,Lq,d]."""
    Qn = Q / (Q.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8)
    Cn = C / (C.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8)
    A = F.leaky_relu(Cn[:, None] @ Qn.transpose(1, 2)[None], 0.1)  # [bc,bq,Lc,Lq]
    A = A / (A.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8)  # normalise over the query axis
    A = A.transpose(2, 3) + mq[None, :, :, None] + mc[:, None, None, :]  # [bc,bq,Lq,Lc]
    P = (lam * A).softmax(-1)
    Lc = C.shape[1]
    keep = (P * Lc - P.sum(-1, keepdim=True) > 0).to(P.dtype)  # focal "equal": above the row mean
    P = P * keep
    P = P / P.sum(-1, keepdim=True)
    return P @ Cn[:, None]  # weighted (normalised) context


def cosine(a, b):
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-8)


def local_sim(words, regions, mt, mv, lam=20.0):
    """S_loc[v, t] = s1[v, t] + s2[t, v]; means over ALL word / region positions (faithful)."""
    s1 = cosine(words[None], attend(words, regions, mt, mv, lam)).mean(-1)  # [v,t]
    s2 = cosine(regions[None], attend(regions, words, mv, mt, lam)).mean(-1)  # [t,v]
    return s2.t() + s1


def rwa_loss(s_loc, lam=20.0):
    logp = F.log_softmax(lam * s_loc, 1)
    eye = torch.eye(s_loc.shape[0], dtype=s_loc.dtype, device=s_loc.device)
    return (logp.exp() * (logp - torch.log(eye + 1e-6))).sum(1).mean()


def losses(gt, gv, lt, lv, mt, mv):
    g = global_sim(gt, gv)
    s = local_sim(lt, lv, mt, mv)
    lg, ll = global_loss(g), rwa_loss(s)
    return dict(global_sim=g, local_sim=s, loss_global=lg, loss_local=ll, loss_total=lg + ll)


def text_mask_additive(attention_mask):
    return (attention_mask[:, 1:].to(torch.float32) - 1.0) * 100.0


def forward_losses(p, c, batch, text_dropout=0.0):
    gt, lt = text_tower(p, c, batch["input_ids"], batch["attention_mask"], text_dropout)
    gv, lv, mv = video_tower(p, c, batch["object"], batch["object_mask"])
    out = losses(gt, gv, lt, lv, text_mask_additive(batch["attention_mask"]), mv)
    out.update(global_text=gt, local_text=lt, global_video=gv, local_video=lv, video_mask=mv)
    return out


def eval_local_sims(lv, lt, mv, mt, segment=8):
    """Published blocked evaluation: S_loc [videos, texts] in segment x segment blocks."""
    nv, nt = lv.shape[0], lt.shape[0]
    sim = torch.zeros(nv, nt)
    with torch.no_grad():
        for i in range(0, nv, segment):
            for j in range(0, nt, segment):
                sim[i:i + segment, j:j + segment] = local_sim(
                    lt[j:j + segment], lv[i:i + segment], mt[j:j + segment], mv[i:i + segment])
    return sim


# ----------------------------------------------------------------------------------------------
# AdamW, published variant (Hugging Face transformers.AdamW): bias correction folded into the
# step size with eps added outside it, then decoupled decay on the updated weights.


class AdamW:
    def __init__(self, params, lr=1e-5, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        self.params = list(params)
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, betas[0], betas[1], eps, weight_decay
        self.t = 0
        self.m = [torch.zeros_like(x) for x in self.params]
        self.v = [torch.zeros_like(x) for x in self.params]

    @torch.no_grad()
    def step(self):
        # one parameter at a time, as the published optimiser does: only one temporary
        # (the denominator) of one tensor's size is alive at any moment
        self.t += 1
        step = self.lr * math.sqrt(1 - self.b2 ** self.t) / (1 - self.b1 ** self.t)
        for x, m, v in zip(self.params, self.m, self.v):
            if x.grad is None:
                continue
            g = x.grad
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            x.addcdiv_(m, v.sqrt().add_(self.eps), value=-step)
            if self.wd > 0:
                x.add_(x, alpha=-self.lr * self.wd)

    def zero_grad(self):
        for x in self.params:
            x.grad = None


# ----------------------------------------------------------------------------------------------
# --check: the fixtures


class Checker:
    def __init__(self):
        self.failed = 0
        self.passed = 0

    def close(self, name, got, ref, rtol):
        """max |got - ref| <= rtol * max(|ref|) (scale-relative, as the fixtures' README states)."""
        got = got.detach().to(torch.float64)
        ref = ref.to(torch.float64).reshape(got.shape) if ref.numel() == got.numel() else ref
        if got.shape != ref.shape:
            self.report(False, name, f"shape {tuple(got.shape)} != {tuple(ref.shape)}")
            return
        scale = max(ref.abs().max().item(), 1e-12)
        err = (got - ref).abs().max().item()
        self.report(err <= rtol * scale, name, f"max_abs_err {err:.3e} scale {scale:.3e} rel {err / scale:.2e} (tol {rtol:g})")

    def report(self, ok, name, msg):
        print(f"{'PASS' if ok else 'FAIL'} {name}: {msg}")
        if ok:
            self.passed += 1
        else:
            self.failed += 1


def load(name):
    from safetensors import safe_open
    path = os.path.join(TESTDATA, name)
    if not os.path.exists(path):
        sys.exit(f"missing fixture {path}")
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def check_model(ck, fname):
    t, meta = load(fname)
    cfgd = json.loads(meta["config"])
    c = Config(**cfgd)
    p = {k[len("param."):]: v.clone().requires_grad_(True) for k, v in t.items() if k.startswith("param.")}
    missing = set(param_shapes(c)) ^ set(p)
    ck.report(not missing, f"{fname} parameter names", f"{len(p)} params" if not missing else f"mismatch {sorted(missing)}")
    ids, am = t["in.input_ids"], t["in.attention_mask"]
    fw = 1e-4  # forward tolerance: float32 through several layers and a different op order

    # Video tower: deterministic, checked exactly.
    gv, lv, mv = video_tower(p, c, t["in.object"], t["in.object_mask"])
    ck.close(f"{fname} out.global_video", gv, t["out.global_video"], fw)
    ck.close(f"{fname} out.local_video", lv, t["out.local_video"], fw)
    ck.close(f"{fname} out.video_mask_additive", mv, t["out.video_mask_additive"], 0.0)

    # Text tower. The fixture's text embeddings were recorded with DistilBERT's training-mode
    # dropout (p = 0.1) active -- the published model calls text_model.train() -- so they are not
    # reproducible without the generator's RNG stream. If they ever match the deterministic
    # forward, check exactly; otherwise check that the gap is the size dropout p = 0.1 produces.
    # The deterministic text code itself is verified against a real pretrained encoder (MiniLM).
    ref_t = torch.cat([t["out.global_text"][:, None], t["out.local_text"]], 1)
    with torch.no_grad():
        gt0, lt0 = text_tower(p, c, ids, am)
        det = torch.cat([gt0[:, None], lt0], 1)
        gap = (det - ref_t).abs().max().item() / ref_t.abs().max().item()
        text_exact = gap <= fw
        if text_exact:
            ck.report(True, f"{fname} out.global_text/out.local_text", f"rel {gap:.2e} (tol {fw:g})")
        else:
            gen = torch.Generator().manual_seed(0)
            sims = []
            for _ in range(64):
                torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=gen)))
                gd, ld = text_tower(p, c, ids, am, dropout=0.1)
                sims.append((torch.cat([gd[:, None], ld], 1) - det).abs().mean().item())
            want, got = statistics.mean(sims), (ref_t - det).abs().mean().item()
            sd = statistics.stdev(sims)
            ok = abs(got - want) <= 4 * sd
            ck.report(ok, f"{fname} out.global_text/out.local_text (recorded with dropout 0.1)",
                      f"not exact (rel {gap:.2e}); mean |fixture - deterministic| {got:.4f} vs dropout-0.1 "
                      f"runs {want:.4f} +- {sd:.4f} (tol 4 sd)")

    # Losses on the fixture's text embeddings and our video embeddings.
    ft = {k: t["out." + k].clone().requires_grad_(True) for k in ("global_text", "local_text")}
    gt_, lt_ = (gt0, lt0) if text_exact else (ft["global_text"], ft["local_text"])
    if text_exact:  # full graph through the text tower
        gt_, lt_ = text_tower(p, c, ids, am)
    out = losses(gt_, gv, lt_, lv, text_mask_additive(am), mv)
    for k, ref in [("global_sim", "out.global_sim_text_video"), ("local_sim", "out.local_sim_video_text"),
                   ("loss_global", "out.loss_global"), ("loss_local", "out.loss_local"), ("loss_total", "out.loss_total")]:
        ck.close(f"{fname} {ref}", out[k], t[ref], 1e-5)
    out["loss_total"].backward()

    # Gradients. Without the dropout masks only the parameters after the text tower can be checked:
    # the whole video tower, and txt_proj.1.bias (= sum of dL/d text embedding over tokens).
    gnames = sorted(k[len("grad."):] for k in t if k.startswith("grad."))
    if not text_exact:
        p["txt_proj.1.bias"].grad = (ft["global_text"].grad + ft["local_text"].grad.sum(1)).sum(0)
    checkable = [n for n in gnames if text_exact or n.startswith("object_model.") or n == "txt_proj.1.bias"]
    worst, bad = (0.0, ""), []
    for n in checkable:
        g, ref = p[n].grad.to(torch.float64), t["grad." + n].to(torch.float64)
        rel = (g - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
        worst = max(worst, (rel, n))
        if rel > 1e-4:
            bad.append(f"{n} rel {rel:.2e}")
    ck.report(not bad, f"{fname} grad.* ({len(checkable)} of {len(gnames)} tensors)",
              f"worst rel {worst[0]:.2e} ({worst[1]}) (tol 1e-4)" + ("; " + ", ".join(bad[:5]) if bad else ""))

    # Which parameters receive a gradient in a full step, and which word-embedding rows (the
    # [PAD] row 0 never does: padding_idx).
    q = {n: v.detach().clone().requires_grad_(True) for n, v in p.items()}
    forward_losses(q, c, dict(input_ids=ids, attention_mask=am, object=t["in.object"],
                              object_mask=t["in.object_mask"]))["loss_total"].backward()
    have = sorted(n for n, v in q.items() if v.grad is not None)
    ck.report(gnames == have, f"{fname} parameters receiving gradients",
              f"{len(have)} (fixture {len(gnames)})" if gnames == have else f"differ: {sorted(set(gnames) ^ set(have))}")
    wn = "text_model.embeddings.word_embeddings.weight"
    rows = (q[wn].grad.abs().sum(1) > 0).nonzero().flatten().tolist()
    rows_ref = (t["grad." + wn].abs().sum(1) > 0).nonzero().flatten().tolist()
    ck.report(rows == rows_ref, f"{fname} word-embedding rows receiving gradients",
              f"{len(rows)} rows, [PAD] row 0 excluded" if rows == rows_ref else f"ours {rows} fixture {rows_ref}")

    # AdamW (published variant) from the fixture's gradients: must match to float32 rounding.
    a = cfgd["adamw"]
    before = {n: v.detach().clone() for n, v in p.items()}
    r = {n: v.clone() for n, v in before.items()}
    for n in gnames:
        r[n].grad = t["grad." + n].clone()
    AdamW(r.values(), lr=a["lr"], betas=(a["beta1"], a["beta2"]), eps=a["eps"], weight_decay=a["weight_decay"]).step()
    worst = max(((r[n] - t["after_adamw." + n]).abs().max().item() / max(t["after_adamw." + n].abs().max().item(), 1e-30), n) for n in r)
    ck.report(worst[0] <= 1e-6, f"{fname} after_adamw.* (published AdamW on the fixture's gradients)",
              f"worst rel {worst[0]:.2e} ({worst[1]}) (tol 1e-6)")
    # ... and on our own gradients. Adam divides by |g|: at step 1 the update is
    # lr*sqrt(c)*g/(sqrt(c)|g| + eps), c = 1 - beta2, whose slope lr*sqrt(c)*eps/(sqrt(c)|g| + eps)^2
    # turns a gradient error within the 1e-4 tolerance into a weight error; allow exactly that.
    r = {n: before[n].clone() for n in checkable}
    for n in checkable:
        r[n].grad = p[n].grad.clone()
    AdamW(r.values(), lr=a["lr"], betas=(a["beta1"], a["beta2"]), eps=a["eps"], weight_decay=a["weight_decay"]).step()
    sc, worst, bad = math.sqrt(1 - a["beta2"]), (0.0, ""), []
    for n in checkable:
        g_ref, ref = t["grad." + n].double(), t["after_adamw." + n].double()
        allow = a["lr"] * sc * a["eps"] * 1e-4 * g_ref.abs().max() / (sc * g_ref.abs() + a["eps"]) ** 2
        ratio = ((r[n].double() - ref).abs() / (allow + 1e-6 * ref.abs().max())).max().item()
        worst = max(worst, (ratio, n))
        if ratio > 1:
            bad.append(n)
    ck.report(not bad, f"{fname} after_adamw.* (our gradients, {len(checkable)} tensors)",
              f"worst err/allowance {worst[0]:.2f} ({worst[1]}); allowance = Adam's slope x 1e-4 gradient tolerance"
              + (f"; over: {bad[:5]}" if bad else ""))
    # For information: torch.optim.AdamW puts eps inside the bias correction and decays first.
    r = {n: v.clone().requires_grad_(True) for n, v in before.items()}
    for n in gnames:
        r[n].grad = t["grad." + n].clone()
    torch.optim.AdamW(r.values(), lr=a["lr"], betas=(a["beta1"], a["beta2"]), eps=a["eps"],
                      weight_decay=a["weight_decay"]).step()
    diff = max((r[n].detach() - t["after_adamw." + n]).abs().max().item() for n in r)
    print(f"INFO {fname}: torch.optim.AdamW (eps {a['eps']:g}) differs from after_adamw.* by up to {diff:.3e} (lr {a['lr']:g})")


def bert_as_distilbert(w):
    """Map Hugging Face BertModel weights onto the DistilBERT names used here (same post-LN
    encoder; token type 0 is folded into the position embeddings)."""
    p = {"text_model.embeddings.word_embeddings.weight": w["embeddings.word_embeddings.weight"],
         "text_model.embeddings.position_embeddings.weight":
             w["embeddings.position_embeddings.weight"] + w["embeddings.token_type_embeddings.weight"][0],
         "text_model.embeddings.LayerNorm.weight": w["embeddings.LayerNorm.weight"],
         "text_model.embeddings.LayerNorm.bias": w["embeddings.LayerNorm.bias"]}
    names = {"attention.q_lin": "attention.self.query", "attention.k_lin": "attention.self.key",
             "attention.v_lin": "attention.self.value", "attention.out_lin": "attention.output.dense",
             "sa_layer_norm": "attention.output.LayerNorm", "ffn.lin1": "intermediate.dense",
             "ffn.lin2": "output.dense", "output_layer_norm": "output.LayerNorm"}
    i = 0
    while f"encoder.layer.{i}.output.dense.weight" in w:
        for ours, theirs in names.items():
            for s in ("weight", "bias"):
                p[f"text_model.transformer.layer.{i}.{ours}.{s}"] = w[f"encoder.layer.{i}.{theirs}.{s}"]
        i += 1
    return p, i


def check_minilm(ck):
    """The text encoder code against a real pretrained BERT-family model's last_hidden_state."""
    path = os.path.join(ROOT, "testmodels", "minilm")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        print("SKIP minilm_l6_last_hidden_state: testmodels/minilm missing (run scripts/fetch-test-models.sh)")
        return
    from safetensors.torch import load_file
    cfg = json.load(open(os.path.join(path, "config.json")))
    p, layers = bert_as_distilbert(load_file(os.path.join(path, "model.safetensors")))
    c = Config(tdim=cfg["hidden_size"], tlayers=layers, theads=cfg["num_attention_heads"])
    t, _ = load("minilm_l6_last_hidden_state.safetensors")
    with torch.no_grad():
        h = text_hidden(p, c, t["in.input_ids"], t["in.attention_mask"])
    ck.close("minilm_l6_last_hidden_state (text encoder, pretrained weights)", h, t["out.last_hidden_state"], 1e-4)


def check_losses(ck, fname):
    t, meta = load(fname)
    ins = {k: t["in." + k].clone().requires_grad_(True) for k in ("global_text", "global_video", "local_text", "local_video")}
    mt = t["in.text_mask_additive"]
    ck.close(f"{fname} text mask from attention_mask", text_mask_additive(t["in.attention_mask"]), mt, 0.0)
    out = losses(ins["global_text"], ins["global_video"], ins["local_text"], ins["local_video"], mt, t["in.video_mask_additive"])
    for k, ref in [("global_sim", "out.global_sim_text_video"), ("local_sim", "out.local_sim_video_text"),
                   ("loss_global", "out.loss_global"), ("loss_local", "out.loss_local"), ("loss_total", "out.loss_total")]:
        ck.close(f"{fname} {ref}", out[k], t[ref], 1e-5)
    out["loss_total"].backward()
    for k, v in ins.items():
        ck.close(f"{fname} grad.{k}", v.grad, t["grad." + k], 1e-4)
    # evaluation: the blocked computation (blocks of 3 so that the blocking is exercised)
    with torch.no_grad():
        g = global_sim(ins["global_text"], ins["global_video"])
        s = eval_local_sims(ins["local_video"], ins["local_text"], t["in.video_mask_additive"], mt, segment=3)
    ck.close(f"{fname} out.eval_sum_as_reference (blocked)", g + s, t["out.eval_sum_as_reference"], 1e-5)
    ck.close(f"{fname} out.eval_sum_aligned (blocked)", g + s.t(), t["out.eval_sum_aligned"], 1e-5)


def run_check(args):
    torch.set_num_threads(args.threads)
    ck = Checker()
    for f in ("loss_small.safetensors", "loss_realistic.safetensors"):
        check_losses(ck, f)
    check_minilm(ck)
    for f in ("model_tiny.safetensors", "model_tiny_1frame.safetensors"):
        check_model(ck, f)
    print(f"{ck.passed} passed, {ck.failed} failed")
    return 1 if ck.failed else 0


# ----------------------------------------------------------------------------------------------
# Benchmarks


def peak_rss_mb():
    """This process's peak RSS in MB. VmHWM (Linux) starts afresh at exec; ru_maxrss does not:
    a child of a big process (demovlp bench spawns us) inherits the parent's maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def random_batch(c, B, Fr, R, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    feat = torch.rand(B, Fr, R, FEAT, generator=g) * 2  # pooled detector features are non-negative
    x1y1 = torch.rand(B, Fr, R, 2, generator=g) * 0.5
    wh = torch.rand(B, Fr, R, 2, generator=g) * 0.5
    box = torch.cat([x1y1, x1y1 + wh, wh], -1)
    obj_mask = torch.ones(B, Fr, R)
    real = torch.randint(min(10, R), R + 1, (B, Fr), generator=g)  # 10..R real regions per frame
    for b in range(B):
        for f in range(Fr):
            obj_mask[b, f, real[b, f]:] = 0
    ids = torch.randint(1000, c.vocab, (B, L), generator=g)
    am = torch.zeros(B, L, dtype=torch.long)
    lens = torch.randint(8, min(L, 40) + 1, (B,), generator=g)  # caption lengths incl. CLS/SEP
    for b in range(B):
        n = int(lens[b])
        ids[b, 0], ids[b, n - 1], ids[b, n:] = 101, 102, 0
        am[b, :n] = 1
    return dict(input_ids=ids, attention_mask=am, object=torch.cat([feat, box], -1), object_mask=obj_mask)


def summary(name, times, extra):
    med = statistics.median(times)
    print(f"{name}: runs " + " ".join(f"{x:.3f}" for x in times) +
          f" s | median {med:.3f} min {min(times):.3f} max {max(times):.3f} s | peak RSS {peak_rss_mb():.0f} MB"
          f" (after import {IMPORT_RSS_MB:.0f} MB)")
    return dict(median_s=med, min_s=min(times), max_s=max(times), peak_rss_mb=round(peak_rss_mb(), 1),
                import_rss_mb=round(IMPORT_RSS_MB, 1), **extra)


def device_of(args):
    """The torch device of --device, and a function that waits for its queued work."""
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch.cuda.is_available() is False")
        return torch.device("cuda"), torch.cuda.synchronize
    return torch.device("cpu"), lambda: None


def bench_train(args):
    c = Config(**dict(PUBLISHED, F=args.frames, R=args.regions))
    dev, sync = device_of(args)
    p = {k: v.detach().to(dev).requires_grad_(True) for k, v in random_params(c, seed=0).items()}
    batch = {k: v.to(dev) for k, v in random_batch(c, args.batch, args.frames, args.regions, args.text_len, seed=1).items()}
    opt = AdamW(p.values(), lr=1e-5, eps=1e-6, weight_decay=0.0)
    n_params = sum(v.numel() for v in p.values())
    # bf16: autocast over the forward and the losses (GEMMs in bf16, fp32 master weights and
    # AdamW), as a PyTorch user's mixed-precision training step does.
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if args.precision == "bf16" else contextlib.nullcontext
    print(f"train-step: torch {torch.__version__}, {dev}, {args.precision}, {torch.get_num_threads()} threads, "
          f"{n_params / 1e6:.1f}M params, batch {args.batch}, {args.frames}x{args.regions} regions, text {args.text_len}")

    phases = {"forward": [], "backward": [], "adamw": []}

    def step():
        sync()
        t0 = time.perf_counter()
        opt.zero_grad()
        with autocast():
            out = forward_losses(p, c, batch, text_dropout=args.text_dropout)
        sync()
        t1 = time.perf_counter()
        out["loss_total"].backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        sync()
        t3 = time.perf_counter()
        return out["loss_total"].item(), (t1 - t0, t2 - t1, t3 - t2)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    for _ in range(args.warmup):
        step()
    times = []
    if args.serve:
        # Interleaved timing: the caller (demovlp bench train-step) alternates its own steps
        # with ours, so both see the same machine conditions. One command per stdin line.
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            if line.strip() != "step":
                break
            loss, ph = step()
            times.append(sum(ph))
            for k, v in zip(phases, ph):
                phases[k].append(v)
            print(json.dumps({"s": times[-1], "loss": loss}), flush=True)
        args.runs = len(times)
    for i in range(0 if args.serve else args.runs):
        t0 = time.perf_counter()
        loss, ph = step()
        times.append(time.perf_counter() - t0)
        for k, v in zip(phases, ph):
            phases[k].append(v)
        print(f"  run {i}: {times[-1]:.3f} s (forward+losses {ph[0]:.3f}, backward {ph[1]:.3f}, "
              f"adamw {ph[2]:.3f}; loss {loss:.4f})")
    gpu = {}
    if dev.type == "cuda":
        gpu = dict(cuda_device=torch.cuda.get_device_name(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   cuda_max_memory_allocated_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1),
                   cuda_max_memory_reserved_mib=round(torch.cuda.max_memory_reserved() / 2**20, 1))
    return summary("train-step", times, dict(
        bench="train-step", impl="pytorch", torch=torch.__version__, threads=torch.get_num_threads(),
        device=str(dev), precision=args.precision, steps_per_s=round(1.0 / statistics.median(times), 4), **gpu,
        batch=args.batch, frames=args.frames, regions=args.regions, text_len=args.text_len, runs=args.runs,
        warmup=args.warmup, text_dropout=args.text_dropout,
        phase_median_s={k: round(statistics.median(v), 4) for k, v in phases.items()}))


def bench_eval_sims(args):
    n, d, words, regions = args.n, args.width, args.text_len - 1, args.frames * args.regions
    g = torch.Generator().manual_seed(3)
    lv = torch.randn(n, regions, d, generator=g)
    lt = torch.randn(n, words, d, generator=g)
    mv = torch.where(torch.rand(n, regions, generator=g) < 0.2, -100.0, 0.0)
    lens = torch.randint(8, 40, (n,), generator=g)
    mt = torch.where(torch.arange(words)[None] < lens[:, None], 0.0, -100.0)
    print(f"eval-sims: torch {torch.__version__}, {torch.get_num_threads()} threads, N={n} videos x N texts, "
          f"{regions} regions, {words} words, width {d}, blocks of 8 (published)")
    times = []
    for i in range(args.runs):
        t0 = time.perf_counter()
        s = eval_local_sims(lv, lt, mv, mt, segment=8)
        times.append(time.perf_counter() - t0)
        print(f"  run {i}: {times[-1]:.3f} s (checksum {s.sum().item():.4f})")
    return summary("eval-sims", times, dict(bench="eval-sims", impl="pytorch", torch=torch.__version__,
                                            threads=torch.get_num_threads(), n=n, regions=regions, words=words,
                                            width=d, runs=args.runs))


def bench_embed(args):
    c = Config(**dict(PUBLISHED, F=args.frames, R=args.regions))
    p = {k: v.detach() for k, v in random_params(c, seed=0).items()}
    batch = random_batch(c, args.batch, args.frames, args.regions, args.text_len, seed=1)
    print(f"embed: torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.frames}x{args.regions} regions, text {args.text_len}")
    res = {}
    with torch.no_grad():
        for name, fn in [("text", lambda: text_tower(p, c, batch["input_ids"], batch["attention_mask"])),
                         ("video", lambda: video_tower(p, c, batch["object"], batch["object_mask"]))]:
            fn()  # warm-up
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            res[name] = med
            print(f"  {name}: batch times " + " ".join(f"{x:.3f}" for x in times) +
                  f" s, median {med:.3f} s -> {args.batch / med:.1f} {'texts' if name == 'text' else 'clips'}/s")
    return dict(bench="embed", impl="pytorch", torch=torch.__version__, threads=torch.get_num_threads(),
                batch=args.batch, texts_per_s=round(args.batch / res["text"], 2),
                clips_per_s=round(args.batch / res["video"], 2), median_s=res["text"] + res["video"],
                peak_rss_mb=round(peak_rss_mb(), 1), import_rss_mb=round(IMPORT_RSS_MB, 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true")
    mode.add_argument("--bench", action="store_true", help="one training step at published size")
    mode.add_argument("--bench-eval-sims", action="store_true")
    mode.add_argument("--bench-embed", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--regions", type=int, default=30)
    ap.add_argument("--text-len", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed runs (--bench)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text-dropout", type=float, default=0.0,
                    help="--bench: DistilBERT training-mode dropout (the published trainer uses 0.1; "
                         "default 0 = the deterministic computation the Rust model does)")
    ap.add_argument("--n", type=int, default=1000, help="--bench-eval-sims: videos = texts = N")
    ap.add_argument("--width", type=int, default=256, help="--bench-eval-sims: embedding width")
    ap.add_argument("--json", action="store_true", help="end with one JSON line")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="--bench: where to train (cuda: one GPU; timings wait for its work; peak GPU memory reported)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="--bench: fp32, or bf16 autocast over the forward and the losses (fp32 weights and AdamW)")
    ap.add_argument("--serve", action="store_true",
                    help="--bench: after the warm-up, print {\"ready\": true}, then run one timed step per "
                         "'step' line on stdin (printing {\"s\": seconds}) until 'done'; then the summary")
    args = ap.parse_args()
    global IMPORT_RSS_MB
    IMPORT_RSS_MB = peak_rss_mb()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.check:
        sys.exit(run_check(args))
    if args.bench:
        res = bench_train(args)
    elif args.bench_eval_sims:
        res = bench_eval_sims(args)
    else:
        res = bench_embed(args)
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()

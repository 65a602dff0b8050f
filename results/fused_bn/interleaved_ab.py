"""Interleaved A/B of one release-recipe training step, plain against fused stem (results/fused_bn).

Needs the code of commit 027abdc (`FusedStemNetwork`), reverted after this measurement:
    git checkout 027abdc -- training && python results/fused_bn/interleaved_ab.py
Steps alternate A B / B A so that a noisy neighbour slows both alike; the first two of each are warm-up.
"""
import time, copy, torch, torch.nn.functional as F, numpy as np
from torch import nn
from training.model import build_model, set_train_mode, FusedStemNetwork
FROZEN=("conv1","bn1","layer1","layer2")
torch.manual_seed(0)
m = build_model("none", frozen=FROZEN, resnet_v1_strides=True).to(memory_format=torch.channels_last); set_train_mode(m, FROZEN)
fused = FusedStemNetwork(m, FROZEN)
plain_stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2)
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
x = torch.randn(64,3,224,224).contiguous(memory_format=torch.channels_last); y = torch.randint(0,2,(64,))
res = {"plain": [], "fused": []}; stem = {"plain": [], "fused": []}
for i in range(16):
    for name, fwd, st in (("plain", m, plain_stem), ("fused", fused, fused.stem)) if i % 2 else (("fused", fused, fused.stem), ("plain", m, plain_stem)):
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16): st(x)
        stem[name].append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16): loss = F.cross_entropy(fwd(x).float(), y)
        opt.zero_grad(); loss.backward(); opt.step()
        res[name].append(time.perf_counter() - t)
for k in res:
    print(k, "step median %.0f ms" % (1000*np.median(res[k][2:])), "stem-only median %.0f ms" % (1000*np.median(stem[k][2:])))
print("step ratio plain/fused %.3f" % (np.median(res["plain"][2:]) / np.median(res["fused"][2:])))

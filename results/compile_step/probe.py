"""The probe of PLAN.md: torch.compile (inductor, CPU) on the release training step, interleaved A/B.

    python results/compile_step/probe.py 64 16 > results/compile_step/probe_b64_r16.txt

Arguments: batch size, rounds (each round times one eager and one compiled step, the order
alternating), compile mode. The last line is the JSON summary; `times_s` has every step.
"""
import copy, sys, time, json
import torch, torch.nn.functional as F
from training.model import build_model, set_train_mode
from training.runtime import Runtime

FROZEN = ("conv1", "bn1", "layer1", "layer2")
bs = int(sys.argv[1]) if len(sys.argv) > 1 else 64
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 6
mode = sys.argv[3] if len(sys.argv) > 3 else "default"
rt = Runtime(torch.device("cpu"), "bf16")
torch.manual_seed(0)
base = build_model("none", frozen=FROZEN, resnet_v1_strides=True).to(memory_format=torch.channels_last)
set_train_mode(base, FROZEN)
models = {"eager": base, "compiled": copy.deepcopy(base)}
opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}
fwd = {"eager": models["eager"], "compiled": torch.compile(models["compiled"], mode=None if mode == "default" else mode)}
x = torch.randn(bs, 3, 224, 224).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 2, (bs,))

def step(k):
    t = time.perf_counter()
    with rt.autocast():
        loss = F.cross_entropy(fwd[k](x).float(), y)
    opts[k].zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(models[k].parameters(), 1.0)
    opts[k].step()
    return time.perf_counter() - t, loss.item()

t0 = time.perf_counter(); print("compile+first step", step("compiled"), "s total", time.perf_counter() - t0, flush=True)
print("compiled 2nd", step("compiled"), flush=True)
print("eager warm", step("eager"), flush=True)
times = {"eager": [], "compiled": []}
for r in range(rounds):
    for k in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
        dt, l = step(k); times[k].append(dt)
    print(r, {k: round(v[-1], 3) for k, v in times.items()}, flush=True)
med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
print(json.dumps({"batch": bs, "median_s": med, "img_s": {k: bs / v for k, v in med.items()}, "ratio": med["eager"] / med["compiled"], "min_s": {k: min(v) for k, v in times.items()},
                  "times_s": times, "torch": torch.__version__, "threads": torch.get_num_threads()}))

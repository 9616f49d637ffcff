"""The library choice of docs/quantization.md: one 1024x1024 layer, 512 tokens, forward + backward
to the input, 1 thread, with torchao's or bitsandbytes' nf4 and int8 (fp32 and bf16 inputs): time
(ms, mean of 5 after a warm-up) and the max relative error of output and input gradient against
F.linear(x, the library's dequantized W) in float64, and the mean relative weight error.

    python benchmarks/bench_quantization_libraries.py ao            # torchao (the installed one)
    pip install --target /tmp/qlib_bnb --no-deps bitsandbytes==0.50.2
    python benchmarks/bench_quantization_libraries.py bnb /tmp/qlib_bnb

Each line: scheme, input dtype, (ms, output error, input-gradient error, weight error).
"""
import sys, time, torch, torch.nn.functional as F
torch.manual_seed(0)
lib = sys.argv[1]
if len(sys.argv) > 2:  # a folder the library was pip-installed into with --target
    sys.path.insert(0, sys.argv[2])
D, T = 1024, 512
torch.set_num_threads(1)
lin = torch.nn.Linear(D, D, bias=False)
def bench(fn, reps=5):
    fn(); t0 = time.perf_counter()
    for _ in range(reps): fn()
    return (time.perf_counter() - t0) / reps * 1e3
x0 = torch.randn(T, D)
def run(mod_fwd, deq, dtype=torch.float32):
    x = x0.clone().to(dtype).detach().requires_grad_(True)
    y = mod_fwd(x); g = torch.randn_like(y); y.backward(g)
    xr = x0.clone().to(dtype).double().requires_grad_(True)
    yr = F.linear(xr, deq.double()); yr.backward(g.double())
    ey = ((y.double() - yr).abs().max() / yr.abs().max()).item()
    eg = ((x.grad.double() - xr.grad).abs().max() / xr.grad.abs().max()).item()
    def step():
        x = x0.to(dtype).detach().requires_grad_(True); y = mod_fwd(x); y.backward(g)
    ms = bench(step)
    werr = ((deq.float() - lin.weight).abs().mean() / lin.weight.abs().mean()).item()
    return ms, ey, eg, werr
print("fp32 ref", bench(lambda: F.linear(x0.clone().requires_grad_(True), lin.weight).sum().backward()))
if lib == "ao":
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4, linear_nf4
    import torchao
    print("torchao", torchao.__version__)
    for dt in (torch.float32, torch.bfloat16):
        w = to_nf4(lin.weight.detach().to(dt))
        deq = w.get_original_weight()
        print("nf4", dt, run(lambda x: linear_nf4(x, w), deq, dt), w.dtype)
    from torchao.quantization import quantize_, Int8WeightOnlyConfig
    for dt in (torch.float32, torch.bfloat16):
        m = torch.nn.Linear(D, D, bias=False); m.weight.data.copy_(lin.weight.to(dt)); m.to(dt)
        m.requires_grad_(False)
        quantize_(m, Int8WeightOnlyConfig())
        wq = m.weight
        print(type(wq).__name__)
        deq = wq.dequantize()
        try:
            print("int8", dt, run(lambda x: m(x), deq, dt))
        except Exception as e:
            print("int8 fail", dt, repr(e)[:300])
else:
    import bitsandbytes as bnb
    print("bnb", bnb.__version__)
    for dt in (torch.float32, torch.bfloat16):
        m = bnb.nn.Linear4bit(D, D, bias=False, compute_dtype=dt, compress_statistics=True, quant_type="nf4")
        m.weight = bnb.nn.Params4bit(lin.weight.detach().to(dt).clone(), requires_grad=False, compress_statistics=True, quant_type="nf4")
        m = m.to("cpu")
        try:
            m(torch.zeros(1, D, dtype=dt))
            deq = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
            print("nf4", dt, run(lambda x: m(x), deq, dt), m.weight.dtype)
        except Exception as e:
            import traceback; traceback.print_exc()
    for dt in (torch.float32, torch.bfloat16):
        try:
            m = bnb.nn.Linear8bitLt(D, D, bias=False, has_fp16_weights=False, threshold=0.0)
            m.weight = bnb.nn.Int8Params(lin.weight.detach().to(dt).clone(), requires_grad=False, has_fp16_weights=False)
            m.weight = m.weight._quantize("cpu")
            m(torch.zeros(1, D, dtype=dt))
            w = m.weight
            deq = w.data.float() * m.state.SCB.float().unsqueeze(1) / 127
            print("int8", dt, run(lambda x: m(x), deq, dt))
        except Exception as e:
            import traceback; traceback.print_exc()

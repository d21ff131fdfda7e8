"""Record every aten op of a HF transformers causal-LM forward+backward (tiny configs).

Usage: python benchmarks/hf_ops.py [variant-substring ...]   (no args: all variants)
Writes <variant>.txt into $HFOPS_OUT (default: benchmarks/data/hf-ops). With HFOPS_DEVICE=cuda
the models run on the GPU and the ``amp_*`` variants run the forward under CUDA autocast, as a
training loop with ``torch.autocast`` does (what CPU runs cannot show: autocast's casts, the
SDPA backend CUDA picks).

Mechanisms:
  * TorchDispatchMode: every aten op (below autograd) with inputs/outputs, storages identified by
    untyped_storage().data_ptr() (+ generation counter so that reused addresses get a new #id).
  * Storage lifetime: weakref.finalize on every Python tensor object that refers to a storage
    (PyObject preservation keeps the Python object alive while C++ (autograd) still holds the
    TensorImpl), refcount per storage; the storage is recorded dead when its last tensor dies.
  * saved_tensors_hooks: pack records (shape, dtype, storage #id -> producing op / param name,
    current module). Under non-reentrant checkpointing the inner checkpoint hooks take over, so
    only what the checkpoint itself keeps is seen (which is what is resident).
  * Module attribution: forward pre/post hooks keep a module stack; in the forward post hook the
    autograd nodes created by that module are tagged (node.metadata['mod']) so that backward ops
    (torch._C._current_autograd_node()) can be attributed to a module too.
"""
import sys
import os
import weakref
import collections
import contextlib
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

OUTDIR = os.environ.get("HFOPS_OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hf-ops")
DEVICE = os.environ.get("HFOPS_DEVICE", "cpu")
B, S = 2, 16
DT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.int64: "i64",
      torch.int32: "i32", torch.bool: "b8", torch.uint8: "u8", torch.float64: "f64"}


def dts(t):
    return DT.get(t, str(t).replace("torch.", ""))


class Recorder(TorchDispatchMode):
    def __init__(self, model):
        super().__init__()
        self.phase = "fwd"
        self.idx = 0
        self.lines = []            # rendered later (saved flags filled after pack)
        self.recs = []
        self.live = {}             # ptr -> sid
        self.sinfo = {}            # sid -> dict(nbytes, producer, name, refs, born, died)
        self.nsid = 0
        self.modstack = ["<root>"]
        self.seqstack = [0]
        self.packs = []
        self.unpacks = collections.Counter()
        self.saved_sids = set()
        self.live_bytes = 0
        self.peak = collections.defaultdict(int)
        self.events = []  # (idx, phase, 'free', sid)
        self.gen = 0
        for n, p in model.named_parameters():
            self.register(p, name="param:" + n, counted=False)
        for n, b in model.named_buffers():
            self.register(b, name="buf:" + n, counted=False)

    # ---- storage bookkeeping -------------------------------------------------------------
    def _new_sid(self, ptr, nbytes, name, counted):
        self.nsid += 1
        sid = self.nsid
        self.live[ptr] = sid
        self.sinfo[sid] = dict(nbytes=nbytes, name=name, refs=0, born=(self.phase, self.idx),
                               died=None, counted=counted, ptr=ptr)
        if counted:
            self.live_bytes += nbytes
            self.peak[self.phase] = max(self.peak[self.phase], self.live_bytes)
        return sid

    def _fin(self, sid):
        info = self.sinfo[sid]
        info["refs"] -= 1
        if info["refs"] == 0 and info["died"] is None:
            info["died"] = (self.phase, self.idx)
            if self.live.get(info["ptr"]) == sid:
                del self.live[info["ptr"]]
            if info["counted"]:
                self.live_bytes -= info["nbytes"]
            self.events.append((self.idx, self.phase, sid))

    def register(self, t, name=None, counted=True):
        """return (sid, is_new)"""
        if not isinstance(t, torch.Tensor):
            return None, False
        try:
            st = t.untyped_storage()
            ptr, nb = st.data_ptr(), st.nbytes()
        except Exception:
            return None, False
        new = False
        if nb == 0:
            return 0, False
        sid = self.live.get(ptr)
        if sid is None or self.sinfo[sid]["died"] is not None:
            sid = self._new_sid(ptr, nb, name, counted)
            new = True
        info = self.sinfo[sid]
        info["refs"] += 1
        weakref.finalize(t, self._fin, sid)
        return sid, new

    def lookup(self, t):
        try:
            ptr = t.untyped_storage().data_ptr()
        except Exception:
            return None
        return self.live.get(ptr)

    def desc(self, t, sid=None):
        if not isinstance(t, torch.Tensor):
            return None
        shp = "(" + ",".join(str(x) for x in t.shape) + ")"
        sid = self.lookup(t) if sid is None else sid
        tag = ""
        if sid:
            nm = self.sinfo[sid]["name"]
            tag = (" " + nm) if nm and not nm.startswith("op") else f" #{sid}"
        elif t.numel() == 0:
            tag = " empty"
        else:
            tag = " ?untracked"
        return f"{shp}{dts(t.dtype)}{tag}"

    def curmod(self):
        if self.phase == "bwd":
            node = torch._C._current_autograd_node()
            if node is not None:
                m = node.metadata.get("mod", "?") if hasattr(node, "metadata") else "?"
                if self.modstack[-1] != "<root>":  # recompute under checkpoint
                    return f"{self.modstack[-1]} (recompute; node {node.name()} of {m})"
                return f"{m} <{node.name()}>"
        return self.modstack[-1]

    # ---- dispatch -------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat_in, _ = tree_flatten((args, kwargs))
        ins = [a for a in flat_in if isinstance(a, torch.Tensor)]
        in_sids = []
        for a in ins:
            s = self.lookup(a)
            if s is None and a.numel() > 0:
                s, _ = self.register(a, name=None)  # e.g. input_ids / untracked
            in_sids.append(s)
        mod = self.curmod()
        out = func(*args, **kwargs)
        self.idx += 1
        flat_out, _ = tree_flatten(out)
        in_ptrs = {}
        for a in ins:
            try:
                in_ptrs[a.untyped_storage().data_ptr()] = a
            except Exception:
                pass
        outs = []
        schema = func._schema
        for i, o in enumerate(flat_out):
            if not isinstance(o, torch.Tensor):
                continue
            try:
                ptr = o.untyped_storage().data_ptr()
            except Exception:
                ptr = None
            alias = None
            if ptr and ptr in in_ptrs:
                ai = schema.returns[i].alias_info if i < len(schema.returns) else None
                alias = "inplace" if (ai is not None and ai.is_write) else "view"
            sid, new = self.register(o, name=f"op{self.idx}")
            if new:
                self.sinfo[sid]["producer"] = (self.phase, self.idx, str(func), mod)
            outs.append((o, sid, new, alias))
        rec = dict(phase=self.phase, idx=self.idx, func=str(func), mod=mod,
                   ins=[self.desc(a, s) for a, s in zip(ins, in_sids)],
                   outs=[(self.desc(o, sid), sid, new, alias,
                          self.sinfo[sid]["nbytes"] if sid else 0) for o, sid, new, alias in outs])
        self.recs.append(rec)
        return out

    # ---- saved tensor hooks --------------------------------------------------------------
    def pack(self, t):
        sid = self.lookup(t)
        if sid is None:
            sid, _ = self.register(t, name=None)
        info = self.sinfo.get(sid, {}) if sid else {}
        prod = info.get("name") if info.get("name") and not str(info.get("name")).startswith("op") \
            else (info.get("producer") and f"{info['producer'][0]} {info['producer'][1]} {info['producer'][2]}")
        self.packs.append(dict(phase=self.phase, idx=self.idx, mod=self.modstack[-1],
                               shape=tuple(t.shape), dtype=dts(t.dtype), sid=sid,
                               nbytes=info.get("nbytes", 0), storage_nbytes=info.get("nbytes", 0),
                               view_nbytes=t.numel() * t.element_size(), prod=prod,
                               isview=t._base is not None))
        if sid:
            self.saved_sids.add(sid)
        return (t, sid)

    def unpack(self, x):
        t, sid = x
        self.unpacks[sid] += 1
        return t


def tag_nodes(out, modname, seq0):
    """tag autograd nodes reachable from out, created during this module's forward (sequence_nr >= seq0)
    and not yet tagged by a child module, with modname."""
    flat, _ = tree_flatten(out if not hasattr(out, "to_tuple") else out.to_tuple())
    stack = [t.grad_fn for t in flat if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    seen = set()
    while stack:
        n = stack.pop()
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        if n.name() == "torch::autograd::AccumulateGrad" or n._sequence_nr() < seq0:
            continue  # ancestors of an older node are older still: prune
        md = n.metadata
        if "mod" not in md:
            md["mod"] = modname
        for nx, _ in n.next_functions:
            if nx is not None:
                stack.append(nx)


def install_module_hooks(model, rec):
    hs = []
    for name, m in model.named_modules():
        nm = name or "<root>"

        def pre(mod, inp, nm=nm):
            rec.modstack.append(nm)
            rec.seqstack.append(torch._C._autograd._get_sequence_nr())

        def post(mod, inp, out, nm=nm):
            rec.modstack.pop()
            seq0 = rec.seqstack.pop()
            if torch.is_grad_enabled():
                try:
                    tag_nodes(out, nm, seq0)
                except Exception:
                    pass
        hs.append(m.register_forward_pre_hook(pre))
        hs.append(m.register_forward_hook(post))
    return hs


def fmt_bytes(n):
    return f"{n}B"


def render(rec, model, title, extra_lines=()):
    L = [f"# {title}", f"# transformers {transformers.__version__} torch {torch.__version__}", *extra_lines]
    saved = rec.saved_sids
    ev_by_idx = collections.defaultdict(list)
    for idx, ph, sid in rec.events:
        ev_by_idx[idx].append(sid)
    L.append("# columns: [phase idx] op  mod=<module | module <autograd node> in backward>  in: ...  out: shape dtype #storage new NB | view/inplace of input; "
             "'SAVED' = storage packed by autograd saved_tensors_hooks; 'free after:' storages whose last tensor died after this op")
    for r in rec.recs:
        outs = []
        for d, sid, new, alias, nb in r["outs"]:
            s = d
            if alias:
                s += f" {alias}"
            elif new:
                s += f" new {nb}B"
            else:
                s += " (existing storage)"
            if sid in saved:
                s += " SAVED"
            outs.append(s)
        line = f"[{r['phase']} {r['idx']}] {r['func']}  mod={r['mod']}  in: {', '.join(r['ins'])}  out: {', '.join(outs)}"
        fr = ev_by_idx.get(r["idx"])
        if fr:
            line += "  | free after: " + ", ".join(
                f"#{s}({rec.sinfo[s]['nbytes']}B)" for s in fr if rec.sinfo[s]["counted"])
        L.append(line)
    return L


def saved_summary(rec, lines):
    lines.append("")
    lines.append("## saved tensors (saved_tensors_hooks pack), grouped by module; storages deduplicated per group")
    groups = collections.OrderedDict()
    for p in rec.packs:
        groups.setdefault((p["phase"], p["mod"]), []).append(p)
    tot_all = set()
    for (ph, mod), ps in groups.items():
        sids = {}
        for p in ps:
            if p["sid"]:
                sids[p["sid"]] = p
        byt = sum(rec.sinfo[s]["nbytes"] for s in sids if rec.sinfo[s]["counted"])
        lines.append(f"- [{ph}] {mod}: {len(ps)} packs, {len(sids)} distinct storages, {byt}B non-param")
        for p in ps:
            nb = rec.sinfo[p['sid']]['nbytes'] if p['sid'] else 0
            lines.append(f"    {p['shape']} {p['dtype']} #{p['sid']} storage {nb}B{' (view)' if p['isview'] else ''} <- {p['prod']}  (pack at op {p['idx']})")
        tot_all |= set(sids)
    lines.append(f"total distinct saved non-param storages: {sum(rec.sinfo[s]['nbytes'] for s in tot_all if s and rec.sinfo[s]['counted'])}B")


def block_summary(rec, prefix, title):
    """compact per-block listing: forward/backward ops in `prefix` that allocate a new storage."""
    L = [f"## block summary: {title} (modules starting with '{prefix}')"]
    def died(sid):
        d = rec.sinfo[sid]["died"]
        return f"{d[0]} {d[1]}" if d else "alive-at-end"
    for ph in ("fwd", "bwd"):
        L.append(f"### {ph}: ops of the block that allocate new storage (op -> out shape dtype bytes, SAVED?, freed at)")
        tot = 0
        for r in rec.recs:
            if r["phase"] != ph or not str(r["mod"]).startswith(prefix):
                continue
            news = [(d, sid, nb) for d, sid, new, alias, nb in r["outs"] if new and sid]
            if not news:
                continue
            sub = r["mod"][len(prefix):].lstrip(".") or "."
            for d, sid, nb in news:
                tot += nb
                L.append(f"  [{ph} {r['idx']}] {r['func'].replace('aten.', '').replace('.default', '')} @{sub}: "
                         f"{d.split(' #')[0]} {nb}B{' SAVED' if sid in rec.saved_sids else ''} -> freed {died(sid)}")
        L.append(f"  sum of new allocations in block ({ph}): {tot}B")
    L.append("### saved tensors packed inside the block (distinct storages)")
    seen = {}
    for p in rec.packs:
        if p["phase"] == "fwd" and str(p["mod"]).startswith(prefix) and p["sid"] and p["sid"] not in seen:
            seen[p["sid"]] = p
    tot = 0
    for sid, p in seen.items():
        i = rec.sinfo[sid]
        if not i["counted"]:
            L.append(f"  {p['shape']} {p['dtype']} <- {p['prod']} (parameter/buffer/input, no extra memory)")
            continue
        tot += i["nbytes"]
        inblock = i.get("producer") and str(i["producer"][3]).startswith(prefix)
        L.append(f"  {p['shape']} {p['dtype']} storage {i['nbytes']}B <- {i.get('producer', ('', '', '', ''))[2]} @{i.get('producer', ('', '', '', ''))[3]}{'' if inblock else ' (produced OUTSIDE block)'} freed {died(sid)}")
    L.append(f"  total saved non-param bytes packed in block: {tot}B")
    return L


def alive_summary(rec, lines, label, model):
    gptr = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            gptr[p.grad.untyped_storage().data_ptr()] = n
    alive = [(s, i) for s, i in rec.sinfo.items() if i["died"] is None and i["counted"]]
    tot = sum(i["nbytes"] for s, i in alive)
    lines.append("")
    lines.append(f"## alive non-param storages at {label}: {len(alive)} storages, {tot}B; peak live so far per phase: {dict(rec.peak)}")
    for s, i in alive:
        pr = i.get("producer")
        g = gptr.get(i["ptr"])
        lines.append(f"    #{s} {i['nbytes']}B <- {pr if pr else i['name']}{'  = grad of ' + g if g else ''}")


# ------------------------------------------------------------------------------------------
def make_config(mt):
    common = dict(vocab_size=128, num_hidden_layers=2, hidden_size=64, intermediate_size=176,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if mt == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=128, n_layer=2, n_embd=64, n_head=4, n_positions=64)
    if mt == "gemma2":
        return AutoConfig.for_model("gemma2", head_dim=16, **common)
    if mt == "qwen2":
        return AutoConfig.for_model("qwen2", tie_word_embeddings=True, **common)
    if mt == "phi3":
        return AutoConfig.for_model(mt, pad_token_id=0, **common)  # default pad 32000 > vocab
    return AutoConfig.for_model(mt, **common)


def build(mt, attn, dtype):
    torch.manual_seed(0)
    cfg = make_config(mt)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    if dtype is not None and dtype != "amp":
        model = model.to(dtype)
    return cfg, model.to(DEVICE)


def cfg_lines(cfg, model):
    d = cfg.to_diff_dict() if hasattr(cfg, "to_diff_dict") else {}
    keys = [k for k in sorted(cfg.to_dict()) if any(w in k for w in (
        "drop", "act", "tie", "bias", "head", "soft", "window", "norm", "rope", "scal", "eps", "layer", "inter", "hidden", "vocab", "n_"))]
    return ["# config: " + ", ".join(f"{k}={getattr(cfg, k, None)}" for k in keys),
            f"# attn_implementation={model.config._attn_implementation} training={model.training}"]


def run_train(mt, attn, dtype, gc=False, train=True, nograd_eval=False, title=None, fwd_kwargs=None, amp=None):
    cfg, model = build(mt, attn, dtype)
    if gc:
        model.gradient_checkpointing_enable()
    model.train(train)
    ids = torch.randint(0, 128, (B, S), device=DEVICE)
    rec = Recorder(model)
    rec.register(ids, name="input_ids", counted=False)
    hs = install_module_hooks(model, rec)
    extra = cfg_lines(cfg, model)
    cast = (torch.autocast(torch.device(DEVICE).type, dtype=amp) if amp is not None
            else contextlib.nullcontext())
    if amp is not None:
        extra.append(f"# autocast {amp} around the forward (loss included)")
    if gc:
        extra.append(f"# gradient checkpointing: is_gradient_checkpointing={model.is_gradient_checkpointing}")
    lines = None
    if nograd_eval:
        with torch.no_grad(), rec, cast:
            out = model(ids)
        lines = render(rec, model, title, extra)
        lines.append(f"# logits: shape {tuple(out.logits.shape)} dtype {out.logits.dtype}; past_key_values={type(out.past_key_values).__name__}")
        alive_summary(rec, lines, "end of no_grad forward (out alive)", model)
        return lines
    with torch.autograd.graph.saved_tensors_hooks(rec.pack, rec.unpack), rec:
        with cast:
            out = model(ids, labels=ids, **(fwd_kwargs or {}))
        rec.phase = "bwd"
        # snapshot before backward
        fwd_alive = [(s, dict(i)) for s, i in rec.sinfo.items() if i["died"] is None and i["counted"]]
        rec.modstack = ["<root>"]
        out.loss.backward()
    rec.phase = "end"
    lines = render(rec, model, title, extra)
    lines.append(f"# logits: shape {tuple(out.logits.shape)} dtype {out.logits.dtype}; loss dtype {out.loss.dtype}")
    lines.append("")
    tot = sum(i["nbytes"] for s, i in fwd_alive)
    lines.append(f"## alive non-param storages at end of forward (before backward; out/loss alive): {len(fwd_alive)} storages, {tot}B")
    for s, i in fwd_alive:
        lines.append(f"    #{s} {i['nbytes']}B <- {i.get('producer') or i['name']}{'  SAVED' if s in rec.saved_sids else ''}")
    saved_summary(rec, lines)
    alive_summary(rec, lines, "end of backward (out still referenced)", model)
    lines.append(f"## unpack counts per saved storage: {dict(rec.unpacks)}")
    pre = "transformer.h.0" if mt == "gpt2" else "model.layers.0"
    lines.append("")
    lines.extend(block_summary(rec, pre, title))
    lines.append("")
    lines.extend(block_summary(rec, "<root>", title + " [root module: loss ops]"))
    lines.extend(block_summary(rec, "lm_head", title + " [lm_head]"))
    del out
    import gc as _gc
    _gc.collect()
    alive_summary(rec, lines, "after `del out` (only grads should remain)", model)
    for h in hs:
        h.remove()
    return lines


def run_generate(mt="llama", attn="sdpa"):
    cfg, model = build(mt, attn, None)
    model.eval()
    ids = torch.randint(0, 128, (B, S), device=DEVICE)
    rec = Recorder(model)
    rec.register(ids, name="input_ids", counted=False)
    hs = install_module_hooks(model, rec)
    steps = []

    # hooks (not a forward wrapper: generate() inspects forward's signature for logits_to_keep)
    def pre(mod, a, k):
        steps.append({kk: (tuple(v.shape) if isinstance(v, torch.Tensor) else (v if isinstance(v, (int, bool)) else type(v).__name__)) for kk, v in k.items()})
        rec.recs.append(dict(phase="gen", idx=rec.idx, func=f"===== generate step {len(steps)} model.forward kwargs {steps[-1]}", mod="", ins=[], outs=[]))

    def post(mod, a, k, r):
        pkv = r.past_key_values
        try:
            ls = [(tuple(l.keys.shape), dts(l.keys.dtype)) for l in pkv.layers]
        except Exception as e:
            ls = repr(e)
        rec.recs.append(dict(phase="gen", idx=rec.idx, func=f"===== end step {len(steps)}: logits {tuple(r.logits.shape)} {r.logits.dtype}; cache {type(pkv).__name__} layers keys {ls}", mod="", ins=[], outs=[]))
    hs.append(model.register_forward_pre_hook(pre, with_kwargs=True))
    hs.append(model.register_forward_hook(post, with_kwargs=True))
    with rec:
        gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    lines = render(rec, model, f"{mt} {attn} fp32 generate(max_new_tokens=4, do_sample=False)", cfg_lines(cfg, model))
    lines.append(f"# generated shape {tuple(gen.shape)}")
    for i, s in enumerate(steps):
        lines.append(f"# step {i + 1} forward kwargs: {s}")
    return lines


def variants():
    V = []
    for mt in ["gpt2", "llama", "qwen2", "mistral", "gemma2", "phi3"]:
        for attn in ["sdpa", "eager"]:
            for dn, dt in [("fp32", None), ("bf16", torch.bfloat16)]:
                V.append((f"{mt}_{attn}_{dn}_train", lambda mt=mt, attn=attn, dt=dt, dn=dn: run_train(
                    mt, attn, dt, title=f"{mt} {attn} {dn} train() forward+backward")))
    for mt in ["gpt2", "llama"]:
        V.append((f"{mt}_sdpa_fp32_gc", lambda mt=mt: run_train(mt, "sdpa", None, gc=True, title=f"{mt} sdpa fp32 train() gradient_checkpointing_enable()")))
        V.append((f"{mt}_sdpa_fp32_evalmode_grad", lambda mt=mt: run_train(mt, "sdpa", None, train=False, title=f"{mt} sdpa fp32 eval() mode, forward+backward with grad")))
        V.append((f"{mt}_sdpa_fp32_nograd", lambda mt=mt: run_train(mt, "sdpa", None, train=False, nograd_eval=True, title=f"{mt} sdpa fp32 eval() + no_grad forward model(ids)")))
        V.append((f"{mt}_sdpa_bf16_nograd", lambda mt=mt: run_train(mt, "sdpa", torch.bfloat16, train=False, nograd_eval=True, title=f"{mt} sdpa bf16 eval() + no_grad forward model(ids)")))
    V.append(("llama_sdpa_fp32_train_numitems", lambda: run_train("llama", "sdpa", None, title="llama sdpa fp32 train() with num_items_in_batch=tensor(30) (Trainer path: reduction=sum then divide)", fwd_kwargs=dict(num_items_in_batch=torch.tensor(30)))))
    V.append(("llama_sdpa_fp32_train_nocache", lambda: run_train("llama", "sdpa", None, title="llama sdpa fp32 train() use_cache=False (what the Trainer does: config.use_cache=False)", fwd_kwargs=dict(use_cache=False))))
    V.append(("llama_sdpa_fp32_generate", lambda: run_generate("llama", "sdpa")))
    for mt in ["gpt2", "llama", "qwen2", "mistral", "gemma2", "phi3"]:
        for attn in ["sdpa", "eager"]:
            for dn, dt in [("amp_bf16", torch.bfloat16), ("amp_fp16", torch.float16)]:
                V.append((f"{mt}_{attn}_{dn}_train", lambda mt=mt, attn=attn, dt=dt, dn=dn: run_train(
                    mt, attn, "amp", title=f"{mt} {attn} {dn} train() forward+backward", amp=dt)))
    for mt in ["gpt2", "llama"]:
        V.append((f"{mt}_sdpa_amp_bf16_gc", lambda mt=mt: run_train(mt, "sdpa", "amp", gc=True, title=f"{mt} sdpa amp bf16 gradient_checkpointing_enable()", amp=torch.bfloat16)))
        V.append((f"{mt}_sdpa_amp_bf16_nograd", lambda mt=mt: run_train(mt, "sdpa", "amp", train=False, nograd_eval=True, title=f"{mt} sdpa amp bf16 eval() + no_grad forward", amp=torch.bfloat16)))
    return V


if __name__ == "__main__":
    os.makedirs(OUTDIR, exist_ok=True)
    sel = sys.argv[1:]
    for name, fn in variants():
        if sel and not any(s in name for s in sel):
            continue
        try:
            lines = fn()
        except Exception as e:
            import traceback
            lines = [f"# {name} FAILED: {e!r}", traceback.format_exc()]
        with open(os.path.join(OUTDIR, name + ".txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print(name, len(lines), "lines", flush=True)

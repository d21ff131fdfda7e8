"""The op library: what each ATen op allocates, what autograd saves, what its backward makes.

Each method records one op of ``vramfit.estimate.graph`` and returns its output tensor(s).
What an op saves and what its backward allocates follow PyTorch's
``tools/autograd/derivatives.yaml`` formulas (torch 2.11) and the CUDA op traces of real
Hugging Face models (benchmarks/data/h200-hf-ops, ``benchmarks/hf_ops.py``): e.g. ``mul``
saves the *other* operand for each input's gradient and computes the second input's gradient
first; ``pow`` saves its input and its backward holds ``x.pow(e - 1)`` and ``e * that`` while it
multiplies; a slice's backward is a full-size zero tensor; ``mm`` makes the weight's gradient
first and ``addmm`` the input's.

Autocast (``torch.autocast``, aten/src/ATen/autocast_mode.cpp) is part of the op library, not
of the models: matmuls and attention run in the autocast dtype (parameters' casts are cached
until autocast exits, activations' are not), ops on the fp32 list (pow, rsqrt, softmax,
log_softmax, layer_norm, nll_loss) run in fp32, and everything else promotes (fp32 wins).
"""

from __future__ import annotations

from collections.abc import Sequence

from vramfit.estimate.graph import FLOATS, Backward, Component, DType, Graph, Tensor
from vramfit.estimate.kernels import H200, Multiprocessors

# embedding_dense_backward (aten/src/ATen/native/cuda/Embedding.cu): up to 3072 indices it
# scatters directly; beyond, it sorts them and sums in partial segments of up to 10 rows.
EMBEDDING_DIRECT_MAX_INDICES = 3072
EMBEDDING_ROWS_PER_SEGMENT = 10
MEM_EFF_LSE_PAD = 32  # memory-efficient attention pads its logsumexp to 32 queries


def promote(*dtypes: DType) -> DType:
    """Type promotion among the float dtypes a model mixes: fp32 wins over 16-bit."""
    first = None
    for d in dtypes:
        if d is DType.fp32:
            return d
        if first is None and d in FLOATS:
            first = d
    return first if first is not None else dtypes[0]


class Ops:
    """Records ops into ``graph``. ``autocast``: the autocast dtype, or None."""

    def __init__(
        self,
        graph: Graph,
        autocast: DType | None,
        *,
        mp: Multiprocessors = H200,
    ) -> None:
        self.g = graph
        self.autocast = autocast
        self.mp = mp
        self.prefix = ""

    # tensors ------------------------------------------------------------------------------
    def _t(
        self,
        name: str,
        numel: int,
        dtype: DType,
        *,
        part: str = "",
        component: Component = Component.activations,
        base: Tensor | None = None,
    ) -> Tensor:
        return Tensor(
            f"{self.prefix}{name}", numel, dtype, component=component, base=base, part=part
        )

    def view(
        self,
        x: Tensor,
        name: str = "",
        *,
        numel: int | None = None,
        copy_backward: bool = False,
    ) -> Tensor:
        """A view (reshape, transpose, a split's ``numel``-element part): no memory.
        ``copy_backward``: its gradient arrives laid out otherwise and the backward reshape
        copies it (``clone`` in ViewBackward0; the h200-hf-ops traces)."""
        size = x.numel if numel is None else numel
        out = self._t(name or self._after(x, "view"), size, x.dtype, base=x, part=x.part)

        def backward(bw: Backward) -> None:
            g = bw.out()
            if copy_backward:
                bw.new(0, dtype=g.dtype if g else None)
            else:
                bw.alias(0, g, view=True)

        self.g.node(f"{self.prefix}view", [x], [out], backward=backward, new_point=False)
        return out

    def copy(self, name: str, x: Tensor, *, part: str = "") -> Tensor:
        """``clone`` / ``.contiguous()`` of a strided tensor: a new tensor; CloneBackward0
        passes the gradient through."""
        out = self._t(name, x.numel, x.dtype, part=part)
        self.g.node(
            f"{self.prefix}{name}", [x], [out], backward=lambda bw: bw.alias(0, bw.out())
        )
        return out

    def _after(self, x: Tensor, what: str) -> str:
        """A name for what an op makes of ``x``, to which ``_t`` adds the block's prefix:
        ``x``'s own name less the prefix it has as an activation of this block (a weight's
        name has none)."""
        return f"{x.name.removeprefix(self.prefix)} {what}"

    def keep(self, *tensors: Tensor) -> None:
        """The model's Python code still holds these (a local variable): they live to here."""
        self.g.node(f"{self.prefix}(held)", list(tensors), [], new_point=False)

    # casts --------------------------------------------------------------------------------
    def cast(self, x: Tensor, dtype: DType, name: str = "", *, part: str = "") -> Tensor:
        """``x.to(dtype)`` (``_to_copy``): a new tensor unless already ``dtype``. A parameter's
        cast made by autocast is cached until autocast exits (``cached_cast``)."""
        if x.dtype is dtype:
            return x
        component = Component.autocast_weight_copies if x.leaf else Component.activations
        out = self._t(name or self._after(x, f"to {dtype.value}"), x.numel, dtype, part=part,
                      component=component)
        self.g.node(
            out.name,
            [x],
            [out],
            backward=lambda bw: bw.new(0),  # ToCopyBackward0: grad.to(x.dtype)
            # autocast caches casts of leaves that require grad (autocast_mode.cpp cached_cast)
            cast_cache=x.leaf and x.trainable and self.autocast is not None,
        )
        return out

    def _autocast_low(self, x: Tensor, part: str = "") -> Tensor:
        return self.cast(x, self.autocast, part=part) if self.autocast and x.dtype.floating else x

    def _autocast_fp32(self, x: Tensor) -> Tensor:
        return self.cast(x, DType.fp32) if self.autocast else x

    # matmuls ------------------------------------------------------------------------------
    def linear(
        self,
        name: str,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        out_features: int,
        *,
        part: str = "",
        conv1d: bool = False,
        component: Component = Component.activations,
    ) -> Tensor:
        """``F.linear`` (mm, or addmm with a bias) or GPT-2's ``Conv1D`` (addmm). Under
        autocast the bias, weight and input are cast first (traces: linear casts the weight
        then the input; Conv1D's addmm the weight, input, bias). Saves the (cast) input and
        weight. Backward: mm makes the weight's gradient first, addmm the input's; the
        input's gradient is a view of the matmul output (reshaped to 3-D), and so is the
        weight's: ``mm_mat2_backward`` computes it for the transposed weight as
        ``grad.t().mm(mat1).t()`` (torch/csrc/autograd/FunctionsManual.cpp), which autograd's
        InputBuffer cannot add into in place (a tied lm_head's gradient and the embedding's
        make a new sum: h200-traces hf3 Adafactor trace)."""
        in_features = weight.numel // out_features
        n = x.numel // in_features
        if self.autocast:
            if conv1d:
                w = self._autocast_low(weight)
                xi = self._autocast_low(x, part)
                b = self._autocast_low(bias) if bias is not None else None
            else:
                b = self._autocast_low(bias) if bias is not None else None
                w = self._autocast_low(weight)
                xi = self._autocast_low(x, part)
        else:
            w, xi, b = weight, x, bias
        dtype = promote(xi.dtype, w.dtype)
        out = self._t(name, n * out_features, dtype, part=part, component=component)
        inputs = [xi, w] + ([b] if b is not None else [])
        biased = b is not None

        def backward(bw: Backward) -> None:
            g = bw.out()
            gdt = g.dtype if g else dtype
            if biased:
                bw.new(0, dtype=gdt, view=True)
                bw.new(1, dtype=gdt, view=True)
                bw.sim.matmul("backward", False)
                bw.alias(2, g)  # maybe_multiply(grad, beta): reduced by validate_outputs
            elif bw.needs(1):
                bw.new(1, dtype=gdt, view=True)
                bw.sim.matmul("backward", False)
                bw.new(0, dtype=gdt, view=True)
            else:  # a frozen weight: at::mm makes the input's gradient, then cuBLAS its
                # workspace (a QLoRA lm_head's backward, the h200-qlora-load traces)
                bw.new(0, dtype=gdt, view=True)
                bw.sim.matmul("backward", False)

        # mm saves its input for the weight's gradient and the weight for the input's
        saved = ([xi] if w.requires_grad else []) + ([w] if xi.requires_grad else [])
        node = self.g.node(f"{self.prefix}{name}", inputs, [out], saved=saved, backward=backward)
        node.matmul = biased
        return out

    def linear_4bit(
        self,
        name: str,
        x: Tensor,
        packed: Tensor,
        out_features: int,
        in_features: int,
        *,
        compute: DType,
        load: DType,
        blocksize: int,
        double_quant: bool,
    ) -> Tensor:
        """bitsandbytes ``Linear4bit`` (0.50.2): ``x.to(compute_dtype)``, then ``gemm_4bit``:
        beyond 4 tokens on CUDA it dequantizes the whole weight to the compute dtype (with
        double quantization after its fp32 absmax) and runs ``F.linear``
        (backends/cuda/ops.py ``_dequant_linear_fallback``); up to 4, a fused kernel. The
        output is cast back to the input dtype. ``MatMul4Bit`` saves no activation; its
        backward dequantizes again (in the load dtype, cast to the gradient's)."""
        xc = self.cast(x, compute)
        n = xc.numel // in_features
        weight = out_features * in_features
        blocks = -(-weight // blocksize)
        scratch: list[tuple[str, int]] = []
        if n > 4:
            if double_quant:
                scratch += [("absmax", blocks * 4), ("absmax + offset", blocks * 4)]
            scratch.append(("dequantized weight", weight * compute.size))
        out = self._t(name, n * out_features, compute)

        def backward(bw: Backward) -> None:
            g = bw.out()
            gdt = g.dtype if g else compute
            keys = [bw.temp_alloc("absmax", blocks * 4)] if double_quant else []
            keys.append(bw.temp_alloc("dequantized weight", weight * load.size))
            if load is not gdt:
                keys.append(bw.temp_alloc("dequantized weight cast", weight * gdt.size))
            bw.new(0, dtype=gdt)
            for key in keys:
                bw.free(key)

        self.g.node(
            f"{self.prefix}{name}", [xc, packed], [out], backward=backward, scratch=scratch
        )
        back = self.cast(out, x.dtype, f"{name} in input dtype")
        # ``x = x.to(self.compute_dtype)`` rebinds the forward's local: the cast lives until
        # ``.to(inp_dtype)`` has made the result, and the caller's argument until the module
        # returns (``attn_output = self.o_proj(attn_output)``; the h200-qlora-load traces)
        self.keep(*dict.fromkeys((xc, x)))
        return back

    def linear_8bit(
        self,
        name: str,
        x: Tensor,
        weight: Tensor,
        out_features: int,
        in_features: int,
        *,
        threshold: float,
        outlier_cols: int = 0,
    ) -> Tensor:
        """bitsandbytes ``Linear8bitLt`` (LLM.int8(), 0.50.2) on CUDA: ``MatMul8bitLt``
        (autograd/_functions.py) with frozen ``Int8Params`` (CB int8, SCB fp32 per row).

        Forward, in order (backends/cuda/ops.py, backends/default/ops.py):
        ``A.to(float16)`` (a copy unless x is fp16); ``int8_vectorwise_quant`` allocates the
        fp32 row statistics and the int8 rows CA first, then, with ``threshold > 0``
        (BitsAndBytesConfig's ``llm_int8_threshold`` default 6.0), ``A.abs() >= threshold``:
        an fp16 ``|A|`` and a bool mask alive together; the fp16 copy dies as it returns.
        ``int8_scaled_mm``: ``int8_linear_matmul`` makes an int32 output, ``int8_mm_dequant``
        an fp16 one and casts it to x's dtype while the int32 one is still alive. CA and its
        statistics are locals of the forward: they live to its end. bitsandbytes' own
        cuBLASLt handle runs the int8 matmul: no PyTorch workspace.
        ``outlier_cols``: how many of the ``in_features`` input columns hold a value at or
        above the threshold in some row (``outliers.any(dim=0)``); the data decide, so it is
        an input (``Quant.int8_outliers``). With any, ``int8_mixed_scaled_mm``
        (backends/default/ops.py) first copies them, ``subA = A[:, outlier_cols]``, in x's
        dtype; then dequantizes the weight's matching columns, ``CB[:, outlier_cols]``
        (int8) times SCB (fp32) times 1/127 (fp32, the first product dying) ``.to(x's
        dtype)``; then ``output.addmm(subA, subB)`` makes a new output after the int8 one.
        Kept: ``ctx.tensors = (CAt, subA, A)`` when x requires grad, i.e. x itself and subA
        (CAt is None for a frozen weight), as a ctx attribute: outside the saved-tensor
        hooks, so a non-reentrant checkpoint (the Trainer's) keeps them to the node's
        backward.
        Backward: ``CB.to(x.dtype, copy=True)`` (the whole weight dequantized),
        ``grad.to(x.dtype)`` where they differ, and the matmul's input gradient (a view)."""
        n = x.numel // in_features
        g = self.g
        dtype = x.dtype
        fp16 = DType.fp16
        prefix = f"{self.prefix}{name}"
        a16 = x
        if dtype is not fp16:
            a16 = self._t(f"{name} fp16 input", x.numel, fp16)
            g.node(f"{prefix} A.to(float16)", [x], [a16])
        ca = self._t(f"{name} int8 input", n * in_features, DType.int8)
        sca = self._t(f"{name} input row statistics", n, DType.fp32)
        g.node(f"{prefix} int8_vectorwise_quant", [a16], [ca, sca])
        if threshold > 0:
            magnitude = self._t(f"{name} |A|", x.numel, fp16)
            g.node(f"{prefix} A.abs()", [a16], [magnitude])
            mask = self._t(f"{name} outlier mask", x.numel, DType.bool)
            g.node(f"{prefix} |A| >= threshold", [magnitude, a16], [mask])
        kept = [x]
        sub_b = None
        if threshold > 0 and outlier_cols:
            sub_a = self._t(f"{name} outlier columns of A", n * outlier_cols, dtype)
            g.node(f"{prefix} A[:, outlier_cols]", [x], [sub_a])
            kept.append(sub_a)
            k_weight = out_features * outlier_cols
            cb_cols = self._t(f"{name} CB[:, outlier_cols]", k_weight, DType.int8)
            g.node(f"{prefix} CB[:, outlier_cols]", [weight], [cb_cols])
            scaled = self._t(f"{name} CB columns * SCB", k_weight, DType.fp32)
            g.node(f"{prefix} CB columns * SCB", [cb_cols, weight], [scaled])
            sub_b = self._t(f"{name} dequantized columns", k_weight, DType.fp32)
            g.node(f"{prefix} * 1/127", [scaled, cb_cols], [sub_b])
            sub_b = self.cast(sub_b, dtype, f"{name} subB")
        out32 = self._t(f"{name} int32 output", n * out_features, DType.int32)
        g.node(f"{prefix} int8_linear_matmul", [ca, weight], [out32])
        out16 = self._t(f"{name} fp16 output", n * out_features, fp16)
        scb = weight  # the Int8Params; SCB is read by the kernel as well
        internals = [ca, sca, out32]

        def backward(bw: Backward) -> None:
            grad = bw.out()
            gdt = grad.dtype if grad else dtype
            keys = [bw.temp_alloc("CB dequantized", out_features * in_features * dtype.size)]
            bw.temp("SCB / 127", out_features * DType.fp32.size)
            if gdt is not dtype:
                keys.append(bw.temp_alloc("grad to input dtype", n * out_features * dtype.size))
            bw.new(0, dtype=dtype, view=True)
            bw.sim.matmul("backward", False)
            for key in keys:
                bw.free(key)

        if sub_b is not None:  # the int8 output, then output.addmm(subA, subB)
            g.node(f"{prefix} int8_mm_dequant", [out32, sca, scb], [out16])
            if dtype is not fp16:  # cast while the int32 output is alive, as below
                cast = self._t(f"{name} int8 output", n * out_features, dtype)
                g.node(f"{prefix} int8 output to input dtype", [out16, out32], [cast])
                out16 = cast
            out = self._t(name, n * out_features, dtype)
            g.node(
                f"{prefix} output.addmm(subA, subB)",
                [x, out16, sub_b, *kept, ca, sca],
                [out],
                kept=kept,
                backward=backward,
            )
            return out
        if dtype is fp16:
            g.node(
                f"{prefix} int8_mm_dequant",
                [x, *internals, scb],
                [out16],
                kept=kept,
                backward=backward,
            )
            return out16
        g.node(f"{prefix} int8_mm_dequant", [out32, sca, scb], [out16])
        out = self._t(name, n * out_features, dtype)
        g.node(
            f"{prefix} output to input dtype",
            [x, out16, *internals],
            [out],
            kept=kept,
            backward=backward,
        )
        return out

    def bmm(self, name: str, a: Tensor, b: Tensor, numel: int, *, part: str = "") -> Tensor:
        """A batched matmul (``torch.matmul`` of 4-D tensors folds to bmm), autocast to 16
        bits. Saves each operand for the other's gradient (``self: grad.bmm(mat2.T)`` needs
        mat2, derivatives.yaml): a frozen side, e.g. k under LoRA on q and v only, keeps the
        other unsaved. Backward makes the second operand's gradient first. Autocast casts
        the second operand first: its wrapper's ``cached_cast`` arguments are evaluated right
        to left (as GCC builds PyTorch; the hf2 Llama trace's q @ k^T)."""
        b = self._autocast_low(b, part)
        a = self._autocast_low(a, part)
        dtype = promote(a.dtype, b.dtype)
        out = self._t(name, numel, dtype, part=part)

        def backward(bw: Backward) -> None:
            bw.new(1)
            bw.sim.matmul("backward", False)
            bw.new(0)

        saved = ([b] if a.requires_grad else []) + ([a] if b.requires_grad else [])
        node = self.g.node(f"{self.prefix}{name}", [a, b], [out], saved=saved, backward=backward)
        node.matmul = False
        return out

    # elementwise --------------------------------------------------------------------------
    def unary(
        self,
        name: str,
        x: Tensor,
        *,
        saves: str = "none",
        fp32: bool = False,
        dtype: DType | None = None,
        part: str = "",
        numel: int | None = None,
    ) -> Tensor:
        """An elementwise op. ``saves``: "input", "output" or "none" (silu/gelu save their
        input, tanh its result, neg and scalar multiplies nothing). ``fp32``: on autocast's
        fp32 list. ``numel``: an output of another size whose gradient is reduced back to the
        input's (repeat_kv's expand + reshape copy, whose backward sums each group)."""
        if fp32:
            x = self._autocast_fp32(x)
        out = self._t(name, x.numel if numel is None else numel, dtype or x.dtype, part=part)
        out.per_row = x.per_row and numel is None
        saved = {"input": [x], "output": [out], "none": []}[saves]

        def backward(bw: Backward) -> None:
            g = bw.out()
            bw.new(0, dtype=promote(g.dtype, x.dtype) if g else None)

        self.g.node(f"{self.prefix}{name}", [x], [out], saved=saved, backward=backward)
        return out

    def scalar(self, name: str, x: Tensor, *, part: str = "") -> Tensor:
        """``x * c`` (c a Python number): saves nothing; its backward makes ``grad * c``
        (``x + c`` is ``add_scalar``, which passes the gradient through)."""
        return self.unary(name, x, part=part)

    def add_scalar(self, name: str, x: Tensor, *, part: str = "") -> Tensor:
        out = self._t(name, x.numel, x.dtype, part=part)
        out.per_row = x.per_row
        self.g.node(
            f"{self.prefix}{name}", [x], [out], backward=lambda bw: bw.alias(0, bw.out())
        )
        return out

    def pow(self, name: str, x: Tensor, *, part: str = "") -> Tensor:
        """``x.pow(e)`` (fp32 list): saves x; backward holds ``x.pow(e-1)`` and ``e * that``
        until the product with the gradient exists (PowBackward0, pow_backward)."""
        x = self._autocast_fp32(x)
        out = self._t(name, x.numel, x.dtype, part=part)

        def backward(bw: Backward) -> None:
            t1 = bw.temp_alloc("x.pow(e - 1)", x.nbytes)
            t2 = bw.temp_alloc("e * x.pow(e - 1)", x.nbytes)
            bw.new(0)
            bw.free(t1)
            bw.free(t2)

        self.g.node(f"{self.prefix}{name}", [x], [out], saved=[x], backward=backward)
        return out

    def binary(
        self, name: str, a: Tensor, b: Tensor, op: str, *, part: str = ""
    ) -> Tensor:
        """``a * b`` or ``a + b`` with broadcasting and type promotion. mul saves the other
        operand for each input that needs a gradient and computes the second input's
        gradient first; add saves nothing and hands its gradient to both (validate_outputs
        reduces a broadcast input's and casts a 16-bit input's)."""
        dtype = promote(a.dtype, b.dtype)
        out = self._t(name, max(a.numel, b.numel), dtype, part=part)
        if op == "add":
            def backward(bw: Backward) -> None:
                g = bw.out()
                bw.alias(0, g)
                bw.alias(1, g)

            self.g.node(f"{self.prefix}{name}", [a, b], [out], backward=backward)
            return out
        saved = ([b] if a.requires_grad else []) + ([a] if b.requires_grad else [])

        def backward_mul(bw: Backward) -> None:
            g = bw.out()
            gd = g.dtype if g else dtype
            bw.new(1, numel=out.numel, dtype=promote(gd, a.dtype))
            bw.new(0, numel=out.numel, dtype=promote(gd, b.dtype))

        self.g.node(f"{self.prefix}{name}", [a, b], [out], saved=saved, backward=backward_mul)
        return out

    def mean(self, name: str, x: Tensor, rows: int) -> Tensor:
        """``x.mean(-1, keepdim=True)``: one value per row; backward expands and divides:
        a full-size gradient (MeanBackward1)."""
        out = self._t(name, rows, x.dtype)
        out.per_row = True
        self.g.node(f"{self.prefix}{name}", [x], [out], backward=lambda bw: bw.new(0))
        return out

    def small(self, name: str, x: Tensor, *, saves: str = "output") -> Tensor:
        """An elementwise op on a per-row tensor (rsqrt of the variance): tiny."""
        return self.unary(name, x, saves=saves, fp32=True)

    def cat(
        self,
        name: str,
        parts: Sequence[Tensor],
        *,
        part: str = "",
        empty_dtype: DType | None = None,
        component: Component = Component.activations,
    ) -> Tensor:
        """``torch.cat``: a new tensor in the promoted dtype (``empty_dtype``: an empty tensor of
        that dtype among the inputs, which still takes part in promotion); backward slices the
        gradient (views), cast back where an input was 16-bit. ``component``: what the new
        tensor is (a DynamicCache's keys and values are the KV cache)."""
        dtypes = [p.dtype for p in parts] + ([empty_dtype] if empty_dtype else [])
        dtype = promote(*dtypes)
        out = self._t(name, sum(p.numel for p in parts), dtype, part=part, component=component)

        def backward(bw: Backward) -> None:
            g = bw.out()
            for i in range(len(parts)):
                bw.alias(i, g, view=True)

        self.g.node(f"{self.prefix}{name}", list(parts), [out], backward=backward)
        return out

    def slice(self, x: Tensor, numel: int, name: str = "") -> Tensor:
        """``x[..., a:b]``: a view; its backward is ``slice_backward``, a full-size zero tensor
        with the gradient copied in."""
        out = self._t(name or self._after(x, "slice"), numel, x.dtype, base=x)
        self.g.node(
            out.name,
            [x],
            [out],
            backward=lambda bw: bw.new(0, dtype=bw.out().dtype if bw.out() else None),
            new_point=False,
        )
        return out

    def dropout(self, name: str, x: Tensor, p: float, *, part: str = "") -> Tensor:
        """``F.dropout`` in training: ``native_dropout`` returns the output and a bool mask,
        which it saves (p = 0 returns the input itself). The CUDA kernel makes the mask first
        (the hf2 GPT-2 355M trace: the 1-byte mask's request, then the output's)."""
        if p <= 0:
            return x
        mask = self._t(f"{name} mask", x.numel, DType.bool, part=part)
        out = self._t(name, x.numel, x.dtype, part=part)
        self.g.node(
            f"{self.prefix}{name}",
            [x],
            [mask, out],
            saved=[mask],
            backward=lambda bw: bw.new(0),
        )
        return out

    # norms --------------------------------------------------------------------------------
    def layer_norm(self, name: str, x: Tensor, w: Tensor, b: Tensor, rows: int) -> Tensor:
        """``native_layer_norm`` (fp32 list): the output and per-row fp32 mean and rstd, which
        it saves with its input and parameters; backward makes the input's, weight's and
        bias's gradients."""
        x = self._autocast_fp32(x)
        out = self._t(name, x.numel, x.dtype, part="norm")
        mean = self._t(f"{name} mean", rows, DType.fp32, part="norm")
        rstd = self._t(f"{name} rstd", rows, DType.fp32, part="norm")

        def backward(bw: Backward) -> None:
            bw.new(0)
            bw.new(1)
            bw.new(2)

        self.g.node(
            f"{self.prefix}{name}",
            [x, w, b],
            [out],
            saved=[x, w, b, mean, rstd],
            hidden=[mean, rstd],
            backward=backward,
        )
        return out

    def embedding(self, name: str, weight: Tensor, ids: Tensor, n: int, hidden: int) -> Tensor:
        """``F.embedding``: rows of the table; backward is ``embedding_dense_backward``, a
        table-sized gradient (past 3072 indices, after sorting them and summing partial
        segments: measured on an H200, benchmarks/data/h200-traces)."""
        out = self._t(name, n * hidden, weight.dtype, part="norm")

        def backward(bw: Backward) -> None:
            g = bw.out()
            bw.new(0, dtype=g.dtype if g else None)
            if n > EMBEDDING_DIRECT_MAX_INDICES:
                partials = n + n // EMBEDDING_ROWS_PER_SEGMENT
                bw.temp("partial sums", partials * hidden * DType.fp32.size)

        self.g.node(f"{self.prefix}{name}", [weight, ids], [out], saved=[ids], backward=backward)
        return out

    # attention ----------------------------------------------------------------------------
    def sdpa(
        self,
        name: str,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        batch: int,
        heads: int,
        seq: int,
        kernel: str,
        dropout: bool = False,
        bool_mask: int = 0,
        mask: Tensor | None = None,
    ) -> Tensor:
        """``F.scaled_dot_product_attention`` through a fused kernel (``kernel``: "cudnn",
        "flash" or "efficient"): the output (laid out tokens first) and the softmax
        statistics, saved with q, k, v; backward makes dq, dk, dv like their inputs and the
        kernel's scratch. Autocast casts v, k and q to 16 bits first.

        ``bool_mask``: the elements of a boolean ``attn_mask`` broadcast to (batch, 1, q, kv).
        SDPA turns it into an additive mask of q's dtype per call, dense, with one
        ``where(mask, 0, -inf)`` (``convert_boolean_attn_mask`` in
        aten/src/ATen/native/transformers/attention.cpp; torch 2.11's ``where_ScalarSelf``,
        with no other request, in the hf5 Phi-3 trace), and the kernel keeps that float mask
        for its backward. ``mask``: the boolean mask itself, an argument of the layer (a
        checkpoint keeps it for its recompute)."""
        # autocast's wrapper casts the arguments as it passes them on, and the compiler
        # evaluates those right to left: v, k, then q (as matmul's k before q, ``bmm``; the
        # 8B TP 4 + SP trace, whose 2 MiB k and v casts come before q's 8 MiB)
        v, k, q = (self._autocast_low(t, "attention") for t in (v, k, q))
        biases: list[Tensor] = []
        if bool_mask:
            bias = self._t(f"{name} float mask", bool_mask, q.dtype, part="attention")
            inputs = [mask] if mask is not None else []
            self.g.node(f"{self.prefix}{name} mask to float", inputs, [bias])
            biases = [bias]
        out = self._t(name, q.numel, q.dtype, part="attention")
        rows = batch * heads * seq
        if kernel == "efficient":
            rows = batch * heads * -(-seq // MEM_EFF_LSE_PAD) * MEM_EFF_LSE_PAD
        stats = self._t(f"{name} logsumexp", rows, DType.fp32, part="attention")
        # the statistics and RNG state exist only for a backward (compute_log_sumexp)
        hidden = [stats] if self.g.grad else []
        rng: list[Tensor] = []
        if self.g.grad and (kernel in ("cudnn", "efficient") or dropout):
            rng = [self._t(f"{name} rng state", 2, DType.int64)]
            hidden += rng

        def backward(bw: Backward) -> None:
            bw.new(0)
            bw.new(1)
            bw.new(2)
            if kernel == "efficient":
                # fp32 memory-efficient attention: grad * out and its row sums (the labelled
                # reference traces, benchmarks/data/h200-traces); the later fp32 dq
                # accumulator is not modelled here
                full = q.numel * DType.fp32.size
                bw.temp("grad * out", full)
                bw.temp("row sums", batch * heads * seq * DType.fp32.size)
            elif kernel == "flash":  # the fp32 dq accumulator and softmax row sums (FA2)
                bw.temp("workspace", q.numel * DType.fp32.size + batch * heads * seq * 4)
            elif kernel == "cudnn":
                # cuDNN's workspace, one request after dq, dk, dv: the fp32 dq accumulator,
                # the softmax row sums and 256 bytes, and with grouped K/V (enable_gqa) dK
                # and dV over every query head in the inputs' dtype, summed into dk and dv
                # (the labelled traces: 7.1 MiB for a Qwen2.5-0.5B with repeated K/V,
                # 48.2 MiB for Llama-3.2-3B and 128.5 MiB for Llama-3-8B, grouped)
                work = q.numel * DType.fp32.size + batch * heads * seq * 4 + 256
                if k.numel < q.numel:  # a training step: as many keys as queries
                    work += 2 * q.numel * q.dtype.size
                bw.temp("workspace", work)

        self.g.node(
            f"{self.prefix}{name}",
            [q, k, v, *biases],
            [out],
            saved=[q, k, v, *biases, out, stats, *rng],
            hidden=hidden,
            backward=backward,
        )
        return out

    def softmax(self, name: str, x: Tensor, *, dtype: DType | None = None) -> Tensor:
        """``softmax(x, dim=-1[, dtype])`` (fp32 list under autocast): saves its output;
        backward makes the input's gradient and a temporary of the output's size."""
        if self.autocast or dtype is DType.fp32:
            x = self.cast(x, DType.fp32)
        return self.softmax_into(name, x, x.dtype)

    def softmax_into(self, name: str, x: Tensor, dtype: DType) -> Tensor:
        """The softmax kernel itself, its output in ``dtype``: saves the output; backward
        makes the input's gradient and a temporary of the output's size
        (``_softmax_backward_data``)."""
        out = self._t(name, x.numel, dtype, part="attention")

        def backward(bw: Backward) -> None:
            bw.new(0)
            bw.temp("grad * output", out.nbytes)

        self.g.node(f"{self.prefix}{name}", [x], [out], saved=[out], backward=backward)
        return out

    # loss ---------------------------------------------------------------------------------
    def cross_entropy(self, logits: Tensor, targets: Tensor) -> Tensor:
        """``F.cross_entropy``: ``log_softmax`` (saves its fp32 output) then ``nll_loss``
        (saves the targets and the total weight). Backward: the nll gradient (a zeroed
        logits-sized tensor) then log_softmax's."""
        x = self._autocast_fp32(logits)
        logp = self._t("log_softmax", x.numel, x.dtype, component=Component.logits)
        self.g.node(
            "log_softmax", [x], [logp], saved=[logp], backward=lambda bw: bw.new(0)
        )
        loss = self._t("loss", 1, DType.fp32, component=Component.logits)
        self.g.node(
            "nll_loss",
            [logp, targets],
            [loss],
            saved=[targets],
            backward=lambda bw: bw.new(0),
        )
        return loss

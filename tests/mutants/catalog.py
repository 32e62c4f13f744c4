"""The curated mutants: plausible bugs the test suite must catch, one text replacement each.

Each mutant names the file it changes, the exact text it replaces (it must occur exactly once: a mutant
whose ``original`` is gone is STALE, an error of the list, never "caught"), its replacement, the tests that
must catch it (pytest node ids or files, and optionally a ``-k`` expression, kept narrow so that a run
stays short), and why it is plausible.
``needs="cuda-device"`` marks mutants only a CUDA GPU can catch (the kernels compile here, but nothing runs
them). When a bug is fixed, add it here: the suite must catch it from then on.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    why: str
    needs: str | None = None  # "cuda-device": unreachable without a CUDA GPU
    select: str | None = None  # a pytest -k expression narrowing the tests (e.g. to one backend's cases)


T_RULES = "tests/test_engine.py::test_engine_matches_oracle_fp32"
T_TRAINER_UPDATE = "tests/test_trainer_update.py"
T_WIDE = "tests/test_ops_wide.py"

MUTANTS: tuple[Mutant, ...] = (
    # -- rewards (vigor/rewards.py) ---------------------------------------------------------------------------
    Mutant(
        "rank-scale-by-G",
        "vigor/rewards.py",
        "shaped = 2.0 * ranks.float() / (group_size - 1) - 1.0",
        "shaped = 2.0 * ranks.float() / group_size - 1.0",
        ("tests/test_rewards.py",),
        "ranks mapped to [-1, 1 - 2/G] instead of [-1, 1]",
    ),
    Mutant(
        "rank-flat-unless-all-valid",
        "vigor/rewards.py",
        "return torch.where(v.any(1, keepdim=True), shaped, 0.0).reshape(-1)",
        "return torch.where(v.all(1, keepdim=True), shaped, 0.0).reshape(-1)",
        ("tests/test_rewards.py",),
        "a group with one invalid completion gets flat rewards",
    ),
    Mutant(
        "raw-reward-length-not-sqrt",
        "vigor/rewards.py",
        "scale = token_counts.to(norms.dtype).sqrt() if sqrt_length",
        "scale = token_counts.to(norms.dtype) if sqrt_length",
        ("tests/test_rewards.py",),
        "T_b instead of sqrt(T_b) in the raw reward",
    ),
    Mutant(
        "advantage-biased-std",
        "vigor/rewards.py",
        "adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + ADVANTAGE_EPS)",
        "adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, correction=0) + ADVANTAGE_EPS)",
        ("tests/test_rewards.py",),
        "population std where docs/reward.md (and TRL) use the unbiased one",
    ),
    Mutant(
        "zscore-invalid-ties-lowest",
        "vigor/rewards.py",
        "z = torch.where(v, z, lowest - 1.0)",
        "z = torch.where(v, z, lowest)",
        ("tests/test_rewards.py",),
        "an invalid completion ties with the group's worst valid one",
    ),
    Mutant(
        "self-certainty-no-log-v",
        "vigor/rewards.py",
        "return -math.log(vocab) - logp.mean(-1)",
        "return -logp.mean(-1)",
        ("tests/test_rewards.py",),
        "KL(U || p) without its -log V term",
    ),
    # -- the token batch (vigor/batch.py) ---------------------------------------------------------------------
    Mutant(
        "ranges-skip-first-row",
        "vigor/batch.py",
        "starts = torch.where(has_loss, first_attended, 0)",
        "starts = torch.where(has_loss, first_attended + 1, 0)",
        ("tests/test_engine.py::test_left_padding_is_skipped_without_a_second_pass",),
        "the first attended row (the prompt's first token) left out of every norm",
    ),
    Mutant(
        "nll-sum-not-mean",
        "vigor/batch.py",
        "return sums / batch.token_counts.clamp_min(1).to(sums.dtype)",
        "return sums",
        ("tests/test_engine.py::test_completion_nll_matches_transformers_loss",),
        "the completion loss summed instead of averaged over its tokens",
    ),
    Mutant(
        "scored-width-cuts-last-token",
        "vigor/batch.py",
        "return [self.ranges.host[b][1] + 1 for b in rows]",
        "return [self.ranges.host[b][1] for b in rows]",
        ("tests/test_engine.py::test_invalid_rows_and_trailing_padding_are_not_run",),
        "the batch cut before the last loss token's column",
    ),
    # -- rules (vigor/rules.py) -------------------------------------------------------------------------------
    Mutant(
        "tied-head-side-no-factor-2",
        "vigor/rules.py",
        "cross = 2.0 * vk.row_dot(self.embedding_grad, head_rows, rows)",
        "cross = vk.row_dot(self.embedding_grad, head_rows, rows)",
        ("tests/test_tied_pair.py",),
        "the cross term without its factor 2 when the embedding's gradient arrives first",
    ),
    Mutant(
        "tied-embedding-side-no-factor-2",
        "vigor/rules.py",
        "cross = 2.0 * vk.row_dot(g_emb, self.head_rows, rows)",
        "cross = vk.row_dot(g_emb, self.head_rows, rows)",
        ("tests/test_tied_pair.py", "tests/test_engine.py::test_tied_cross_term_is_included"),
        "the cross term without its factor 2 when the head's gradient arrives first",
    ),
    Mutant(
        "linear-bias-dropped",
        "vigor/rules.py",
        '        if getattr(module, "bias", None) is not None:\n'
        '            out["bias"] = vk.bias_sq_norms(g, rows, backend=ctx.backend)\n'
        "        pair = ctx.tied.get(id(module.weight))",
        "        pair = ctx.tied.get(id(module.weight))",
        (T_RULES,),
        "Linear biases (Qwen2's q/k/v) missing from the norm",
    ),
    Mutant(
        "scaled-embedding-multiplier-dropped",
        "vigor/rules.py",
        "g = grad if kept.multiplier is None else grad * kept.multiplier",
        "g = grad",
        (T_RULES,),
        "Gemma's scaled embedding treated as a plain one",
    ),
    Mutant(
        "affine-slope-not-differenced",
        "vigor/rules.py",
        "return run(1.0) - run(0.0)",
        "return run(1.0)",
        (T_RULES,),
        "Gemma's (1 + w) * xhat norm: xhat taken as 2 * xhat",
    ),
    # -- torch backend ----------------------------------------------------------------------------------------
    Mutant(
        "torch-ghost-offdiagonal-once",
        "vigor_kernels/torch_backend/linear.py",
        "total += 2.0 * flat_dot(xi @ x[i1:].T, gi @ g[i1:].T)",
        "total += flat_dot(xi @ x[i1:].T, gi @ g[i1:].T)",
        ("tests/test_ops.py::test_torch_backend_never_builds_a_t_by_t_tensor",),
        "the ghost sum's off-diagonal row blocks counted once (only reached when T needs several chunks)",
    ),
    Mutant(
        "torch-direct-skips-a-column",
        "vigor_kernels/torch_backend/linear.py",
        "block = g[:, o0 : o0 + step].T @ x",
        "block = g[:, o0 + 1 : o0 + step].T @ x",
        ("tests/test_ops.py::test_linear_strided_and_per_head",),
        "an off-by-one in the direct method's output chunks",
        select="torch",
    ),
    Mutant(
        "torch-bias-per-token",
        "vigor_kernels/torch_backend/reductions.py",
        "out[b] = gb.sum(0).square().sum()",
        "out[b] = gb.square().sum()",
        ("tests/test_ops.py::test_bias_and_norm_weight",),
        "sum of per-token squared gradients instead of the squared per-sample gradient",
        select="torch",
    ),
    Mutant(
        "torch-embedding-ignores-padding",
        "vigor_kernels/torch_backend/embedding.py",
        "live = ranges.row_mask(ids.shape[1], ids.device) & (ids >= 0)",
        "live = ranges.row_mask(ids.shape[1], ids.device)",
        ("tests/test_ops.py::test_embedding",),
        "padding_idx tokens (id -1 after normalization) counted as a vocabulary row",
        select="torch",
    ),
    Mutant(
        "torch-rows-one-early",
        "vigor_kernels/torch_backend/_chunks.py",
        "yield b, tuple(t[b, start:end].float() for t in tensors)",
        "yield b, tuple(t[b, max(0, start - 1) : end].float() for t in tensors)",
        ("tests/test_ops.py::test_linear_strided_and_per_head",),
        "a sample's rows taken from one before its range",
        select="torch",
    ),
    Mutant(
        "torch-flat-dot-fp32-blas",
        "vigor_kernels/torch_backend/_chunks.py",
        "return torch.linalg.vecdot(a, b).sum(dtype=torch.float64).float()",
        "return torch.dot(a.reshape(-1), b.reshape(-1))",
        (f"{T_WIDE}::test_linear_at_real_widths",),
        "a bug fixed here: one BLAS sdot over a 4870 x 900 block drifts 1.02e-4 relative (fp32 accumulation); "
        "caught by a thin margin that depends on the BLAS build",
        select="torch and direct",
    ),
    # -- cpp backend (rebuilt in the scratch copy) ------------------------------------------------------------
    Mutant(
        "cpp-reduction-chunk-width",
        "csrc/cpu/reductions.cpp",
        "for (long f0 = 0; f0 < d; f0 += kChunk) items.push_back({i, f0});",
        "for (long f0 = 0; f0 < d; f0 += kChunk + 8) items.push_back({i, f0});",
        (f"{T_WIDE}::test_bias_and_norm_weight_at_real_widths",),
        "a feature-chunk stride that skips 8 features per 256 (2% off at d = 300, nothing at d <= 150)",
        select="cpp",
    ),
    Mutant(
        "cpp-ghost-offdiagonal-once",
        "csrc/cpu/isa_impl.inc",
        "total += 2.0 * double(dot(x + start, g + start, cols - start));",
        "total += double(dot(x + start, g + start, cols - start));",
        ("tests/test_ops.py::test_linear",),
        "the Gram product's upper triangle counted once",
        select="cpp",
    ),
    Mutant(
        "cpp-ghost-diagonal-twice",
        "csrc/cpu/isa_impl.inc",
        "      start = r + 1;",
        "      start = r;",
        ("tests/test_ops.py::test_linear",),
        "the Gram diagonal counted three times",
        select="cpp",
    ),
    Mutant(
        "cpp-direct-input-blocks",
        "csrc/cpu/linear.cpp",
        "for (long c0 = 0; c0 < pin; c0 += bn) items.push_back({i, m0, c0});",
        "for (long c0 = 0; c0 < pin; c0 += bn + 16) items.push_back({i, m0, c0});",
        (f"{T_WIDE}::test_linear_at_real_widths", "tests/test_cpp_backend.py::test_linear_many_blocks"),
        "the direct kernel's input-feature blocks stepped too far (only wide inputs have several)",
        select="cpp",
    ),
    Mutant(
        "cpp-embedding-no-accumulate",
        "csrc/cpu/embedding.cpp",
        "for (int64_t f = 0; f < d; ++f) acc[f] += load_as_float(g, dtype, base + f);",
        "for (int64_t f = 0; f < d; ++f) acc[f] = load_as_float(g, dtype, base + f);",
        ("tests/test_ops.py::test_embedding",),
        "a repeated token's rows overwrite instead of adding up",
        select="cpp",
    ),
    Mutant(
        "cpp-tied-rows-width",
        "csrc/cpu/embedding.cpp",
        "const long width = std::min<long>(cols, d - item.c0);",
        "const long width = std::min<long>(cols, d - item.c0 - 1);",
        ("tests/test_ops.py::test_tied_cross_term",),
        "the last feature of each tied head row left out",
        select="cpp",
    ),
    Mutant(
        "cpp-head-exp-no-lower-clamp",
        "csrc/cpu/isa_impl.inc",
        "  x = select(x < lo, lo, x);\n",
        "",
        (
            "tests/test_cpp_head.py::test_extreme_logits_stay_finite",
            "tests/test_cpp_head.py::test_exp_and_tanh_accuracy",
        ),
        "the head's exp without its lower clamp: -inf or the LOWEST sentinel give garbage exponents, not 0",
    ),
    Mutant(
        "cpp-head-sum-drops-tail",
        "csrc/cpu/isa_impl.inc",
        "  if (tail > 0) sum.add(select(in_tail, exp_vec(hload_partial(z + j, tail, kLowest) - m), HVec{}));\n",
        "",
        ("tests/test_cpp_head.py::test_kernels_match_torch_reference",),
        "a row's last columns (past the last full vector) left out of its sum of exps",
    ),
    Mutant(
        "cpp-head-onehot-shifted",
        "csrc/cpu/isa_impl.inc",
        "const long rel = target - j;",
        "const long rel = target - j - 1;",
        ("tests/test_cpp_head.py::test_kernels_match_torch_reference",),
        "the -1 of the target's column subtracted one column to the right",
    ),
    Mutant(
        "cpp-head-overlapping-rows-accepted",
        "vigor_kernels/compiled.py",
        "or (n > 1 and c > 0 and z.stride(0) < c)",
        "or (n > 1 and c > 0 and z.stride(0) < 0)",
        ("tests/test_cpp_head.py::test_bad_chunks_are_refused",),
        "a logits chunk whose rows overlap reaches the in-place kernels",
    ),
    # -- triton backend (TRITON_INTERPRET=1) ------------------------------------------------------------------
    Mutant(
        "triton-ghost-offdiagonal-once",
        "vigor_kernels/triton_backend/linear_ghost.py",
        "total = tl.where(i == j, total, 2.0 * total)",
        "total = tl.where(i == j, total, total)",
        ("tests/test_triton_kernels.py::TestLinearGhost::test_matches_torch_backend",),
        "off-diagonal tile pairs counted once (only with more than one 16-row tile)",
    ),
    Mutant(
        "triton-reduction-overlapping-chunks",
        "vigor_kernels/triton_backend/reductions.py",
        "cols = chunk * BLOCK_D + tl.arange(0, BLOCK_D)",
        "cols = chunk * (BLOCK_D - 1) + tl.arange(0, BLOCK_D)",
        ("tests/test_triton_kernels.py::TestReductions",),
        "feature chunks that overlap by one column",
    ),
    Mutant(
        "triton-embedding-ignores-segment-end",
        "vigor_kernels/triton_backend/embedding.py",
        "acc += tl.load(ptrs, mask=ok[:, None] & col_ok, other=0.0).to(tl.float32)",
        "acc += tl.load(ptrs, mask=col_ok, other=0.0).to(tl.float32)",
        ("tests/test_triton_kernels.py::TestEmbedding::test_long_segments_and_wide_features",),
        "a segment's last block reads rows of the next token",
    ),
    Mutant(
        "triton-direct-one-row-too-many",
        "vigor_kernels/triton_backend/linear_direct.py",
        "live = (rows < hi)[:, None]",
        "live = (rows <= hi)[:, None]",
        ("tests/test_triton_kernels.py::TestLinearDirect::test_row_chunks_match_torch_backend",),
        "the direct kernel reads one row past each chunk (padding, or the next chunk's first row)",
    ),
    # -- cuda backend (compiled here; only a GPU runs it) -----------------------------------------------------
    Mutant(
        "cuda-ghost-offdiagonal-once",
        "csrc/cuda/norms.cu",
        "const float w = (I != J || c > r) ? 2.0f : 1.0f;",
        "const float w = 1.0f;",
        ("tests/test_cuda_backend.py", "tests/test_ops.py::test_linear"),
        "off-diagonal Gram entries counted once",
        needs="cuda-device",
        select="cuda",
    ),
    Mutant(
        "cuda-row-sum-one-too-many",
        "csrc/cuda/norms.cu",
        "for (int64_t t = start; t < end; ++t) {",
        "for (int64_t t = start; t <= end; ++t) {",
        ("tests/test_cuda_backend.py", "tests/test_ops.py::test_bias_and_norm_weight"),
        "the bias/norm reduction reads one row past the sample's range",
        needs="cuda-device",
        select="cuda",
    ),
    # -- TRL bridge (vigor/integrations/trl.py) ---------------------------------------------------------------
    Mutant(
        "trl-ignores-eval-group-size",
        "vigor/integrations/trl.py",
        "group_size = trainer.num_generations if trainer.model.training else trainer.num_generations_eval",
        "group_size = trainer.num_generations",
        ("tests/test_trl_bridge.py::test_eval_mode_ranks_within_eval_groups",),
        "evaluation completions ranked in groups of the training size",
    ),
    Mutant(
        "trl-wrong-local-slice",
        "vigor/integrations/trl.py",
        "here = slice(self.process_index * rows, (self.process_index + 1) * rows)",
        "here = slice(0, rows)",
        ("tests/test_trl_bridge.py::test_split_group_is_gathered_before_shaping",),
        "every process returns the first process's rewards",
    ),
    Mutant(
        "trl-truncated-not-masked",
        "vigor/packing.py",
        "masked = bool(truncated[i]) and mask_truncated",
        "masked = False",
        ("tests/test_packing.py::test_trl_layout_by_hand",),
        "mask_truncated_completions ignored: truncated completions scored as valid",
    ),
    Mutant(
        "trl-stats-count-invalid",
        "vigor/integrations/trl.py",
        "    valid = token_counts > 0\n    stats = {",
        "    valid = token_counts >= 0\n    stats = {",
        ("tests/test_trl_bridge.py::test_vigor_stats_by_hand",),
        "the logged norm statistics include invalid completions' zero norms",
    ),
    # -- trainer (vigor/trainer) ------------------------------------------------------------------------------
    Mutant(
        "trainer-accumulation-divides-by-micro",
        "vigor/trainer/loop.py",
        'denominator = float(size if cfg.grpo.loss_type == "grpo" else max(1, n_tokens))',
        'denominator = float(micro if cfg.grpo.loss_type == "grpo" else max(1, n_tokens))',
        (T_TRAINER_UPDATE,),
        "gradient accumulation averaging each micro-batch on its own",
    ),
    Mutant(
        "trainer-no-clipping",
        "vigor/trainer/loop.py",
        "grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))",
        "grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, math.inf))",
        (T_TRAINER_UPDATE,),
        "gradient clipping lost (the norm is still logged)",
    ),
    Mutant(
        "grpo-ignores-epsilon-high",
        "vigor/trainer/grpo.py",
        "clipped = torch.clamp(ratio, 1 - cfg.epsilon, 1 + high)",
        "clipped = torch.clamp(ratio, 1 - cfg.epsilon, 1 + cfg.epsilon)",
        ("tests/test_trainer_units.py::test_clipped_surrogate_by_hand",),
        "the asymmetric upper clip (epsilon_high) ignored",
    ),
    Mutant(
        "grpo-row-sum-not-mean",
        "vigor/trainer/grpo.py",
        "per_row = (per_token * mask).sum(1) / mask.sum(1).clamp_min(1)",
        "per_row = (per_token * mask).sum(1)",
        ("tests/test_trainer_units.py::test_clipped_surrogate_by_hand",),
        "loss_type=grpo summing a completion's tokens instead of averaging them",
    ),
    Mutant(
        "checkpoint-optimizer-not-restored",
        "vigor/trainer/checkpoint.py",
        '    optimizer.load_state_dict(state["optimizer"])\n',
        "",
        ("tests/test_trainer_units.py::test_checkpoint_round_trip_and_mismatch",),
        "resuming with a fresh optimizer state",
    ),
    Mutant(
        "lr-warmup-starts-at-zero",
        "vigor/trainer/loop.py",
        "return (step + 1) / (warmup_steps + 1)",
        "return step / (warmup_steps + 1)",
        ("tests/test_trainer_units.py::test_lr_schedules_by_hand",),
        "the first warm-up step at LR 0",
    ),
    Mutant(
        "completion-mask-drops-eos",
        "vigor/trainer/sampling.py",
        "mask = torch.arange(width, device=completions.device)[None, :] <= first[:, None]",
        "mask = torch.arange(width, device=completions.device)[None, :] < first[:, None]",
        ("tests/test_trainer_units.py::test_completion_masks_end_at_the_first_eos",),
        "the EOS token itself left out of the loss",
    ),
    # -- this session's fixes: the leaked graph, the length-split passes -----------------------------------------
    Mutant(
        "grad-hooks-left-on-the-graph",
        "vigor/engine.py",
        "            for handle in scoring.grad_hooks:\n                handle.remove()\n",
        "",
        ("tests/test_one_pass.py::test_a_pass_leaves_no_graph_behind",),
        "a bug fixed here: the pass's tensor hooks point back at it, so a graph held from it leaked every step",
    ),
    Mutant(
        "length-pass-wrong-rows",
        "vigor/engine.py",
        "picked = [[rows[i] for i in chunk] for chunk in chunks]",
        "picked = [rows[: len(chunk)] for chunk in chunks]",
        ("tests/test_length_buckets.py",),
        "a split pass's norms written to the first rows of the batch instead of the rows it scored",
    ),
    Mutant(
        "length-pass-cut-one-column-short",
        "vigor/batch.py",
        "return self.select(rows, max(self.scored_widths(rows), default=0))",
        "return self.select(rows, max(self.scored_widths(rows), default=1) - 1)",
        ("tests/test_length_buckets.py",),
        "a split pass cut before its widest row's last scored token",
    ),
    # -- book-kept update gradients (vigor/update_grads.py) ----------------------------------------------------
    Mutant(
        "bookkept-bias-not-scaled",
        "vigor/update_grads.py",
        'out["bias"] = g.reshape(-1, g.shape[-1]).transpose(0, 1) @ scaled.weights(g)',
        'out["bias"] = g.reshape(-1, g.shape[-1]).sum(0)',
        ("tests/test_one_pass.py::test_shared_pass_gives_the_autograd_update_and_the_engine_norms",),
        "a linear bias's book-kept gradient summed over samples without their coefficients c_b",
        select="bookkept and qwen2",
    ),
    Mutant(
        "bookkept-scaled-input-reused-for-another-input",
        "vigor/update_grads.py",
        "shared = self._last is not None and self._last[0] == key",
        "shared = self._last is not None",
        ("tests/test_one_pass.py::test_shared_pass_gives_the_autograd_update_and_the_engine_norms",),
        "the previous layer's scaled input reused without checking it is the same memory",
        select="bookkept and llama",
    ),
)

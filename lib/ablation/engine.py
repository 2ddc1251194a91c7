"""Batched ablation engine: many unit groups × many prompts per forward pass (stages 6 and 7).

A *group* is a set of `hook_mlp_out` coordinates `{layer: [ids]}`. Evaluating G groups on P
prompts means G×P greedy generations; the engine packs them into batches of at most
`batch_size` rows, each row carrying its own coordinate mask and replacement values.

Decode-only mode (DESIGN 4.2): the prompt minus its last token is prefilled once per prompt
set, without hooks; that KV cache is shared read-only by every group test. The last prompt
position (step 0) and every decode step (step t) run with the intervention. Full-sequence mode
re-prefills every prompt with the intervention on all real positions. Finished rows leave the
batch at once (their cache rows are dropped), so the cost of a step follows the live rows.

Layer skipping (decode-only, on by default): an intervention at layers >= L cannot change what
layers < L compute, which depends only on the tokens fed so far. So rows are grouped into
*classes* of equal (prompt, generated tokens): layers < L run once per class, and only layers
>= L run once per row, starting from the class's residual stream. Classes split when their rows
generate different tokens. The answers are those of the full forward pass; the compute of the
skipped layers is saved for every row that shares its class with others. With permanent hooks
on the bridge (which may carry state between layers) every layer runs for every row.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from lib.models.generation import _cut_at_stop, eos_token_ids, length_sorted_batches
from lib.models.loading import LoadedModel

__all__ = [
    "Group",
    "Recorder",
    "ReplacementValues",
    "PreparedPrompts",
    "AblationEngine",
    "FirstStepScores",
    "normalise_group",
    "mlp_hook_name",
]

Group = Mapping[int, Sequence[int]]  # MLP layer -> hook_mlp_out coordinate ids


class Recorder(Protocol):
    """Observer of unablated `hook_mlp_out` activations `[R_live, T, d]` at hooked positions."""

    layers: Sequence[int]

    def __call__(self, layer: int, act: torch.Tensor, live: torch.Tensor, step_index: torch.Tensor,
                 real: torch.Tensor) -> None: ...


def mlp_hook_name(layer: int) -> str:
    """TransformerLens name of the MLP's write into the residual stream at `layer`."""
    return f"blocks.{layer}.hook_mlp_out"


def normalise_group(group: Group, n_layers: int, d_model: int) -> dict[int, list[int]]:
    """Sorted, deduplicated ids per layer; out-of-range layers or ids raise a clear error."""
    out: dict[int, list[int]] = {}
    for layer, ids in group.items():
        L = int(layer)
        if not 0 <= L < n_layers:
            raise ValueError(f"layer m{L} does not exist (the model has {n_layers} layers)")
        clean = sorted({int(i) for i in ids})
        if clean and not (0 <= clean[0] and clean[-1] < d_model):
            raise ValueError(f"unit id out of range for m{L}: ids must lie in [0, {d_model})")
        if clean:
            out[L] = clean
    return out


class ReplacementValues:
    """What an ablated coordinate is replaced by; `zero` unless tables are given.

    `means[L]` is a `[S, d_model]` table: S=1 for a position-independent value, else one row per
    generation step (decode-only) or per token position (full-sequence), the last row serving
    every later step. `donor_fn(L, ids)` (donor variants) returns a `[S, len(ids)]` table that
    depends on the ablated set, as the donor rule requires.
    """

    def __init__(self, intervention: str = "zero", means: Mapping[int, torch.Tensor] | None = None,
                 donor_fn: Callable[[int, list[int]], torch.Tensor] | None = None) -> None:
        self.intervention = intervention
        self.means = dict(means or {})
        self.donor_fn = donor_fn

    @property
    def positional(self) -> bool:
        return any(t.shape[0] > 1 for t in self.means.values())

    def group_values(self, layer: int, ids: list[int], d_model: int) -> torch.Tensor:
        """`[S, len(ids)]` replacement values for the coordinates `ids` of `layer`."""
        if self.donor_fn is not None:
            return self.donor_fn(layer, ids)
        if self.intervention == "zero" or layer not in self.means:
            if self.intervention != "zero":
                raise KeyError(f"no mean values were estimated for layer m{layer}")
            return torch.zeros((1, len(ids)))
        return self.means[layer][:, ids]


@dataclass
class _Chunk:
    """Up to `batch_size` prompts, left-padded, with the unhooked cache of all but the last token."""

    index: list[int]
    last_ids: torch.Tensor  # [P, 1] (decode-only) or full ids [P, T]
    mask: torch.Tensor  # [P, T] attention mask of the whole prompt
    positions: torch.Tensor  # [P, T] position ids
    cache: object | None  # DynamicCache of positions :-1 (decode-only)


@dataclass
class PreparedPrompts:
    """A prompt set ready for repeated group tests (cache built once, shared by every test)."""

    prompts: list[str]
    chunks: list[_Chunk] = field(default_factory=list)


def _select_cache_rows(cache: object, rows: torch.Tensor, layers: range | None = None) -> object:
    """A new cache holding `rows` of `cache` (rows may repeat); `cache` itself is not modified.

    With `layers`, only those layers are copied and selected; every other slot of the new cache
    refers to the first selected layer, so that sequence-length queries (masks) stay right."""
    new = copy.copy(cache)
    chosen = range(len(cache.layers)) if layers is None else layers  # type: ignore[attr-defined]
    own = {i: copy.copy(cache.layers[i]) for i in chosen}  # type: ignore[attr-defined]
    for layer in own.values():
        layer.batch_select_indices(rows)
    first = own[chosen[0]]
    new.layers = [own.get(i, first) for i in range(len(cache.layers))]  # type: ignore[attr-defined]
    return new


def _select_layer_rows(cache: object, rows: torch.Tensor, layers: range) -> None:
    """Keep `rows` of `cache` in the given layers only (in place)."""
    for i in layers:
        cache.layers[i].batch_select_indices(rows)  # type: ignore[attr-defined]


class _Passthrough(torch.nn.Module):
    """Stands in for a decoder layer that must not run: returns the residual stream unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states


class _SkippedLayers:
    """Context manager: the decoder layers `skip` are pass-throughs while it is open."""

    def __init__(self, layers: torch.nn.ModuleList, skip: range) -> None:
        self.layers, self.skip = layers, skip
        self.saved: dict[int, torch.nn.Module] = {}

    def __enter__(self) -> "_SkippedLayers":
        for i in self.skip:
            self.saved[i] = self.layers[i]
            self.layers[i] = _Passthrough()
        return self

    def __exit__(self, *exc: object) -> None:
        for i, module in self.saved.items():
            self.layers[i] = module


class _BatchIntervention:
    """Per-row masks and values of one packed batch; the hook reads the current step and live rows."""

    def __init__(self, masks: dict[int, torch.Tensor], values: dict[int, torch.Tensor]) -> None:
        self.masks = masks  # layer -> [R, d] bool
        self.values = values  # layer -> [S, R, d]
        self.live = None  # index tensor of live rows (None = all)
        self.step_index: torch.Tensor | None = None  # [R_live, T] table row per position
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_state(self, live: torch.Tensor | None, step_index: torch.Tensor) -> None:
        self.live, self.step_index, self._cache = live, step_index, {}

    def hooks(self) -> list[tuple[str, Callable]]:
        return [(mlp_hook_name(L), self._hook_for(L)) for L in self.masks]

    def _hook_for(self, layer: int) -> Callable:
        def hook(act: torch.Tensor, hook: object = None) -> torch.Tensor:
            mask, vals = self.masks[layer], self.values[layer]
            if self.live is not None:
                mask, vals = mask[self.live], vals[:, self.live]
            idx = self.step_index.clamp(max=vals.shape[0] - 1)  # [R, T]
            rows = torch.arange(mask.shape[0], device=act.device)[:, None]
            repl = vals[idx, rows]  # [R, T, d]
            return torch.where(mask[:, None, :], repl.to(act.dtype), act)

        return hook


def _decoder_layers(model: LoadedModel) -> torch.nn.ModuleList | None:
    """The HF decoder's layer list when it has one entry per layer (else layer skipping is off)."""
    try:
        layers = model.hf_model.get_decoder().layers
    except (AttributeError, ValueError):
        return None
    return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) == model.n_layers else None


@dataclass
class _StepScores:
    """First-step scores of one pack's rows (row order)."""

    logprob: torch.Tensor  # [R] log-probability of the target token
    margin: torch.Tensor  # [R] target logit minus the best other logit
    argmax: torch.Tensor  # [R] greedy token

    @staticmethod
    def of(logits: torch.Tensor, targets: torch.Tensor | str, rows: torch.Tensor,
           choices: torch.Tensor | None = None) -> "_StepScores":
        """Scores from step-0 logits `[R, 1, V]`; `targets` per prompt of the chunk (indexed by `rows`)
        or "greedy" (each row's own argmax, used to read the unablated reference). With `choices`
        (label token ids) the greedy token and the margin's rival are taken among the labels only;
        the log-probability stays over the whole vocabulary."""
        last = logits[:, -1, :].float()
        if choices is not None:
            restricted = torch.full_like(last, float("-inf"))
            restricted[:, choices] = last[:, choices]
            last_for_choice = restricted
        else:
            last_for_choice = last
        argmax = last_for_choice.argmax(dim=-1)
        tgt = argmax if isinstance(targets, str) else targets[rows]
        lp = torch.log_softmax(last, dim=-1).gather(1, tgt[:, None])[:, 0]
        t_logit = last.gather(1, tgt[:, None])[:, 0]
        other = last_for_choice.scatter(1, tgt[:, None], float("-inf")).max(dim=-1).values
        return _StepScores(lp.cpu(), (t_logit - other).cpu(), argmax.cpu())


@dataclass
class FirstStepScores:
    """Per prompt (prompt order) of one group: the target's log-probability and logit margin at the
    first answer position, and the greedy first token there."""

    logprob: torch.Tensor
    margin: torch.Tensor
    argmax_tokens: torch.Tensor

    @staticmethod
    def empty(n: int) -> "FirstStepScores":
        return FirstStepScores(torch.full((n,), float("nan")), torch.full((n,), float("nan")),
                               torch.full((n,), -1, dtype=torch.long))

    def set(self, i: int, pack: "_StepScores", r: int) -> None:
        self.logprob[i], self.margin[i], self.argmax_tokens[i] = pack.logprob[r], pack.margin[r], pack.argmax[r]


class AblationEngine:
    """Greedy answers of prompts under many interventions, packed into full batches."""

    def __init__(self, model: LoadedModel, max_new_tokens: int, batch_size: int = 64,
                 stop_strings: Sequence[str] = (), decode_only: bool = True, layer_skip: bool = True,
                 choice_token_ids: Sequence[int] | None = None) -> None:
        """`choice_token_ids`: answer with one of these tokens (a label set read by a one-step
        greedy choice among them, which equals the log-likelihood choice for one-token labels);
        None: free greedy decoding."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        self.model = model
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.stop_strings = tuple(stop_strings)
        self.decode_only = bool(decode_only)
        self.eos = torch.tensor(eos_token_ids(model), device=model.device)
        tok = model.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else int(self.eos[0])
        self.n_forward_rows = 0  # rows × calls, for throughput reports
        self.decoder_layers = _decoder_layers(model) if layer_skip and decode_only else None
        self.choices = (None if choice_token_ids is None
                        else torch.as_tensor(list(choice_token_ids), dtype=torch.long, device=model.device))
        if self.choices is not None and (len(self.choices) < 2 or self.max_new_tokens != 1):
            raise ValueError("choice_token_ids needs >= 2 label tokens and max_new_tokens == 1")

    # ---- prompt preparation ------------------------------------------------------------------
    @torch.inference_mode()
    def prepare(self, prompts: Sequence[str]) -> PreparedPrompts:
        """Tokenise, chunk (≤ batch_size prompts each) and, in decode-only mode, prefill once."""
        tok = self.model.tokenizer
        max_len = max(1, self.model.n_ctx - self.max_new_tokens)
        enc = tok(list(prompts), add_special_tokens=True, truncation=True, max_length=max_len)["input_ids"]
        if any(len(e) == 0 for e in enc):
            raise ValueError("a prompt tokenises to nothing; every prompt needs at least one token")
        n_chunks = max(1, math.ceil(len(enc) / self.batch_size))
        size = math.ceil(len(enc) / n_chunks) if enc else 0
        out = PreparedPrompts(list(prompts))
        for idx in length_sorted_batches([len(e) for e in enc], size or 1):
            batch = tok.pad({"input_ids": [enc[i] for i in idx]}, padding=True, return_tensors="pt")
            ids = batch["input_ids"].to(self.model.device)
            mask = batch["attention_mask"].to(self.model.device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = None
            if self.decode_only:
                from transformers import DynamicCache

                cache = DynamicCache()
                if ids.shape[1] > 1:
                    self.model.bridge(ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                                      past_key_values=cache, use_cache=True, logits_to_keep=1)
                out.chunks.append(_Chunk(list(idx), ids[:, -1:], mask, pos, cache))
            else:
                out.chunks.append(_Chunk(list(idx), ids, mask, pos, None))
        return out

    # ---- evaluation --------------------------------------------------------------------------
    def record(self, prepared: PreparedPrompts, recorder: "Recorder", progress: bool | str = False) -> list[str]:
        """Unablated greedy answers while `recorder` sees every hooked activation."""
        bar = tqdm(total=len(prepared.prompts), desc=progress if isinstance(progress, str) else "recording",
                   unit="prompt", disable=not progress, dynamic_ncols=True)
        answers = [""] * len(prepared.prompts)
        for chunk in prepared.chunks:
            for j, text in enumerate(self._run_pack(chunk, [{}], ReplacementValues(), recorder)[0]):
                answers[chunk.index[j]] = text
            bar.update(len(chunk.index))
        bar.close()
        return answers

    @staticmethod
    def _recording_hook(layer: int, recorder: "Recorder", state: dict) -> Callable:
        def hook(act: torch.Tensor, hook: object = None) -> None:
            recorder(layer, act, state["live"], state["step_index"], state["real"])

        return hook

    def generate(self, prepared: PreparedPrompts, groups: Sequence[Group | None],
                 replacement: ReplacementValues | None = None, progress: bool | str = False) -> list[list[str]]:
        """Answers `[len(groups)][len(prompts)]`; a `None` or empty group is the unablated model."""
        return self.generate_scored(prepared, groups, replacement, progress)[0]

    def first_tokens(self, prepared: PreparedPrompts) -> torch.Tensor:
        """The unablated model's first answer token of every prompt (`[P]`, prompt order): the
        reference whose log-probability `generate_scored` reports under each intervention."""
        return self.generate_scored(prepared, [None], targets="greedy")[1][0].argmax_tokens

    def generate_scored(self, prepared: PreparedPrompts, groups: Sequence[Group | None],
                        replacement: ReplacementValues | None = None, progress: bool | str = False,
                        targets: torch.Tensor | str | None = None) -> tuple[list[list[str]], list["FirstStepScores"] | None]:
        """Answers, and with `targets` (a `[P]` tensor of token ids, or "greedy" for each row's own
        first token) the first answer position's log-probability of the target and the logit margin
        of the target over the best other token, per group and prompt: the continuous effect CHA
        measures besides the binary flip. Scoring costs nothing extra: step 0 runs anyway."""
        repl = replacement or ReplacementValues("zero")
        norm = [normalise_group(g or {}, self.model.n_layers, self.model.d_model) for g in groups]
        answers: list[list[str]] = [[""] * len(prepared.prompts) for _ in norm]
        P_all = len(prepared.prompts)
        scores = None if targets is None else [FirstStepScores.empty(P_all) for _ in norm]
        tgt_all = None if targets is None or isinstance(targets, str) else torch.as_tensor(targets, dtype=torch.long)
        total = len(norm) * len(prepared.prompts)
        bar = tqdm(total=total, desc=progress if isinstance(progress, str) else "group tests",
                   unit="gen", disable=not progress or total == 0, dynamic_ncols=True)
        # Packs of groups with nearby lowest layers let layer skipping skip more.
        order = sorted(range(len(norm)), key=lambda g: min(norm[g], default=-1))
        for chunk in prepared.chunks:
            per_batch = max(1, self.batch_size // len(chunk.index))
            for start in range(0, len(norm), per_batch):
                pack = order[start:start + per_batch]
                tgt = None
                if targets is not None:
                    tgt = ("greedy" if tgt_all is None
                           else tgt_all[torch.as_tensor(chunk.index)].to(self.model.device))
                texts, first = self._run_pack(chunk, [norm[g] for g in pack], repl, targets=tgt)
                for k, g in enumerate(pack):
                    for j, i in enumerate(chunk.index):
                        answers[g][i] = texts[k * len(chunk.index) + j]
                        if scores is not None:
                            scores[g].set(i, first, k * len(chunk.index) + j)
                bar.update(len(pack) * len(chunk.index))
        bar.close()
        return answers, scores

    def _intervention(self, groups: list[dict[int, list[int]]], P: int, repl: ReplacementValues) -> _BatchIntervention:
        """Masks and values for a pack: group k owns rows k·P … (k+1)·P−1."""
        d, dev = self.model.d_model, self.model.device
        R = len(groups) * P
        layers = sorted({L for g in groups for L in g})
        masks = {L: torch.zeros((R, d), dtype=torch.bool, device=dev) for L in layers}
        per_layer: dict[int, list[tuple[int, list[int], torch.Tensor]]] = {L: [] for L in layers}
        for k, g in enumerate(groups):
            for L, ids in g.items():
                masks[L][k * P:(k + 1) * P, ids] = True
                per_layer[L].append((k, ids, repl.group_values(L, ids, d).to(dev, torch.float32)))
        values = {}
        for L in layers:
            S = max(v.shape[0] for _, _, v in per_layer[L])
            table = torch.zeros((S, R, d), dtype=torch.float32, device=dev)
            for k, ids, v in per_layer[L]:
                vv = v if v.shape[0] == S else torch.cat([v, v[-1:].expand(S - v.shape[0], -1)])
                table[:, k * P:(k + 1) * P, :][:, :, ids] = vv[:, None, :].expand(S, P, len(ids))
            values[L] = table
        return _BatchIntervention(masks, values)

    @torch.inference_mode()
    def _run_pack(self, chunk: _Chunk, groups: list[dict[int, list[int]]], repl: ReplacementValues,
                  recorder: Recorder | None = None, targets: torch.Tensor | str | None = None
                  ) -> tuple[list[str], "_StepScores | None"]:
        """Greedy decode of every (group, prompt) row of one pack; texts in row order, and the
        first step's scores of `targets` (per prompt of the chunk, or "greedy") when asked.

        `recorder(layer, act, live_rows, step_index, real)` observes unablated activations of
        every hooked call (used to estimate mean replacement values)."""
        first = min((L for g in groups for L in g), default=0)
        if (recorder is None and self.decoder_layers is not None and first > 0
                and chunk.cache is not None and chunk.cache.get_seq_length() > 0 and not self._permanent_hooks()):
            return self._run_pack_skipping(chunk, groups, repl, first, targets)
        P, G = len(chunk.index), len(groups)
        R = G * P
        dev = self.model.device
        rows = torch.arange(P, device=dev).repeat(G)
        inter = self._intervention(groups, P, repl) if any(groups) else None
        hooks = inter.hooks() if inter is not None else []
        state: dict[str, torch.Tensor] = {}
        if recorder is not None:
            hooks = hooks + [(mlp_hook_name(L), self._recording_hook(L, recorder, state)) for L in recorder.layers]
        mask = chunk.mask[rows]
        if self.decode_only:
            from transformers import DynamicCache

            cache = _select_cache_rows(chunk.cache, rows) if chunk.cache.get_seq_length() > 0 else DynamicCache()
            ids, pos = chunk.last_ids[rows], chunk.positions[rows][:, -1:]
            step_index = torch.zeros((R, 1), dtype=torch.long, device=dev)
        else:
            from transformers import DynamicCache

            cache = DynamicCache()
            ids, pos = chunk.last_ids[rows], chunk.positions[rows]
            step_index = pos.clone()
        live = torch.arange(R, device=dev)
        generated = torch.full((R, self.max_new_tokens), self.pad_id, dtype=torch.long, device=dev)
        n_done = torch.zeros(R, dtype=torch.long, device=dev)  # tokens written per row
        for step in range(self.max_new_tokens):
            if inter is not None:
                inter.set_state(None if len(live) == R else live, step_index)
            state.update(live=live, step_index=step_index, real=mask[:, -ids.shape[1]:].bool())
            kwargs = dict(attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                          logits_to_keep=1)
            if hooks:
                with self.model.bridge.hooks(fwd_hooks=hooks):
                    logits = self.model.bridge(ids, **kwargs)
            else:
                logits = self.model.bridge(ids, **kwargs)
            if step == 0 and targets is not None:
                first_scores = _StepScores.of(logits, targets, rows, self.choices)
            nxt, keep = self._advance(logits, generated, n_done, live, step)
            if keep is None:
                break
            if len(keep) < len(live):
                cache.batch_select_indices(keep)
                live, mask = live[keep], mask[keep]
                pos, step_index = pos[keep], step_index[keep]
            mask = torch.cat([mask, torch.ones((len(live), 1), dtype=mask.dtype, device=dev)], dim=1)
            pos = pos[:, -1:] + 1
            step_index = step_index[:, -1:] + 1
            ids = nxt[keep][:, None]
        return self._texts(generated, n_done), (first_scores if targets is not None else None)

    def _permanent_hooks(self) -> bool:
        """Whether permanent hooks sit on the bridge (steering, planted test units): they may carry
        state from one layer to another, so layer skipping is not safe with them."""
        return any(h.is_permanent for hp in self.model.bridge.hook_dict.values() for h in hp.fwd_hooks)

    def _advance(self, logits: torch.Tensor, generated: torch.Tensor, n_done: torch.Tensor, live: torch.Tensor,
                 step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Greedy tokens of the live rows, stored; with the positions (in `live`) of the rows that go
        on, or None when the pack is done (every row finished, or the token budget is spent)."""
        self.n_forward_rows += len(live)
        if self.choices is None:
            nxt = logits[:, -1, :].argmax(dim=-1)
        else:
            nxt = self.choices[logits[:, -1, self.choices].argmax(dim=-1)]
        finished = self._finished_rows(generated, n_done, live, step, nxt)
        if step == self.max_new_tokens - 1 or bool(finished.all()):
            return nxt, None
        return nxt, torch.nonzero(~finished).flatten()

    def _finished_rows(self, generated: torch.Tensor, n_done: torch.Tensor, live: torch.Tensor, step: int,
                       nxt: torch.Tensor) -> torch.Tensor:
        """Store the step's tokens of the live rows; which of them are finished (EOS or stop string)."""
        generated[live, step] = nxt
        n_done[live] = step + 1
        finished = torch.isin(nxt, self.eos)
        if self.stop_strings:
            tok = self.model.tokenizer
            for r in torch.nonzero(~finished).flatten().tolist():
                text = tok.decode(generated[live[r], :step + 1], skip_special_tokens=True)
                if _cut_at_stop(text, self.stop_strings)[1]:
                    finished[r] = True
        return finished

    def _texts(self, generated: torch.Tensor, n_done: torch.Tensor) -> list[str]:
        """Decoded answers of every row, cut at the first stop string."""
        tok = self.model.tokenizer
        texts = []
        for r in range(generated.shape[0]):
            text = tok.decode(generated[r, : int(n_done[r])], skip_special_tokens=True)
            texts.append(_cut_at_stop(text, self.stop_strings)[0] if self.stop_strings else text)
        return texts

    @torch.inference_mode()
    def _run_pack_skipping(self, chunk: _Chunk, groups: list[dict[int, list[int]]], repl: ReplacementValues,
                           first: int, targets: torch.Tensor | str | None = None
                           ) -> tuple[list[str], "_StepScores | None"]:
        """`_run_pack` in decode-only mode with layers < `first` run once per class of rows.

        A class is a set of rows with the same prompt and the same tokens generated so far; all
        its rows have the same residual stream entering layer `first`, because every
        intervention of the pack acts at layer `first` or later. Per step: (1) layers < first on
        one row per class (cache `low`), returning the residual entering layer `first`;
        (2) layers >= first on every live row from that residual (cache `high`, hooks on).
        Classes then split by the token each row produced."""
        P, G = len(chunk.index), len(groups)
        R, N = G * P, self.model.n_layers
        dev = self.model.device
        lower, upper = range(0, first), range(first, N)
        rows = torch.arange(P, device=dev).repeat(G)
        inter = self._intervention(groups, P, repl)
        hooks = inter.hooks()
        low = _select_cache_rows(chunk.cache, torch.arange(P, device=dev), lower)
        high = _select_cache_rows(chunk.cache, rows, upper)
        cls_ids, cls_mask, cls_pos = chunk.last_ids, chunk.mask, chunk.positions[:, -1:]
        row_cls = rows.clone()  # class of each live row
        mask, pos = chunk.mask[rows], chunk.positions[rows][:, -1:]
        step_index = torch.zeros((R, 1), dtype=torch.long, device=dev)
        live = torch.arange(R, device=dev)
        generated = torch.full((R, self.max_new_tokens), self.pad_id, dtype=torch.long, device=dev)
        n_done = torch.zeros(R, dtype=torch.long, device=dev)
        kwargs = dict(use_cache=True, logits_to_keep=1)
        for step in range(self.max_new_tokens):
            # TransformerLens stops the forward at block `first` and returns the residual entering it.
            resid = self.model.bridge(cls_ids, attention_mask=cls_mask, position_ids=cls_pos, past_key_values=low,
                                      use_cache=True, stop_at_layer=first)[row_cls]  # [R_live, 1, d]
            inter.set_state(None if len(live) == R else live, step_index)
            with _SkippedLayers(self.decoder_layers, lower), self.model.bridge.hooks(fwd_hooks=hooks):
                logits = self.model.bridge(resid, attention_mask=mask, position_ids=pos, past_key_values=high,
                                           **kwargs)
            if step == 0 and targets is not None:
                first_scores = _StepScores.of(logits, targets, rows, self.choices)
            nxt, keep = self._advance(logits, generated, n_done, live, step)
            if keep is None:
                break
            if len(keep) < len(live):
                _select_layer_rows(high, keep, upper)
                live, mask, pos, step_index = live[keep], mask[keep], pos[keep], step_index[keep]
            nxt, row_cls = nxt[keep], row_cls[keep]
            # New classes: (old class, token) pairs of the rows still running.
            vocab = logits.shape[-1]
            uniq, row_cls = torch.unique(row_cls * vocab + nxt, return_inverse=True)
            parent = uniq // vocab
            if len(parent) != len(cls_ids) or bool((parent != torch.arange(len(parent), device=dev)).any()):
                _select_layer_rows(low, parent, lower)
                cls_mask, cls_pos = cls_mask[parent], cls_pos[parent]
            cls_ids = (uniq % vocab)[:, None]
            cls_mask = torch.cat([cls_mask, torch.ones((len(cls_ids), 1), dtype=cls_mask.dtype, device=dev)], dim=1)
            cls_pos = cls_pos + 1
            mask = torch.cat([mask, torch.ones((len(live), 1), dtype=mask.dtype, device=dev)], dim=1)
            pos = pos + 1
            step_index = step_index + 1
        return self._texts(generated, n_done), (first_scores if targets is not None else None)

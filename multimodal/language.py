"""The language head: CoCa's multimodal text decoder on top of the shared causal text encoder,
and its token generation (greedy, beam search, sampling) with a KV cache.

The text encoder's token states (the unimodal layers, shared with the contrastive loss and the
diffusion decoder) go through ``layers`` more causal blocks that cross-attend to the image
encoder's tokens; logits come from the tied token embedding. Without an image the
cross-attention is skipped: text-only completion and scoring.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encoders.blocks import KVCache, LayerNorm, Transformer

from .config import GenerationArgs, LanguageHeadConfig


class LanguageHead(nn.Module):
    """Multimodal decoder blocks over text states [B, N, W], cross-attending to image tokens."""

    def __init__(self, config: LanguageHeadConfig, width: int, image_width: int, backend: str | None = None):
        super().__init__()
        self.config = config
        self.transformer = Transformer(
            width, config.layers, config.heads, config.mlp_ratio, config.activation, context_dim=image_width, backend=backend
        )
        self.transformer.init_weights()
        self.ln_final = LayerNorm(width)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def forward(
        self, text_states: torch.Tensor, image_states: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        # text_states [B, N, W], image_states [B, M, Wi] or None -> hidden [B, N, W]
        return self.ln_final(self.transformer(text_states, causal=True, context=image_states, cache=cache))


def _filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float) -> torch.Tensor:
    """Keep the top-k tokens and the smallest set whose probability reaches top_p; others -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # tokens after the nucleus is full
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate_tokens(
    step_logits,
    prompts: list[list[int]],
    args: GenerationArgs,
    eot_token_id: int,
    context_length: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> list[list[int]]:
    """Continue each prompt (token ids, start-of-text first) until end-of-text or
    ``max_new_tokens``; returns the new tokens of each (end-of-text excluded).

    ``step_logits(tokens [R, N], start, cache, rows) -> logits [R, V]`` runs the model on
    positions start .. start + N - 1 of rows ``rows`` (indices into the prompts, repeated per
    beam) and returns the last position's logits; with ``cache=None`` it gets the whole prefix
    each step (the slow reference path).

    Prompts of different lengths share one loop: every row advances one position per step and
    rows still inside their prompt are forced to their next prompt token, so a batch gives the
    same tokens as one call per prompt.
    """
    if not prompts or any(len(p) < 1 for p in prompts):
        raise ValueError("each prompt needs at least the start-of-text token")
    lengths = [len(p) for p in prompts]
    if max(lengths) >= context_length:
        raise ValueError(f"a prompt of {max(lengths)} tokens leaves no room in context_length {context_length}")
    b, k = len(prompts), args.num_beams
    rows = torch.arange(b, device=device).repeat_interleave(k)  # [B*K]: prompt of each row
    total = min(context_length, max(lengths) + args.max_new_tokens)
    seq = torch.zeros(b * k, total, dtype=torch.long, device=device)  # [B*K, T]
    for i, p in enumerate(prompts):
        seq[i * k : (i + 1) * k, : len(p)] = torch.tensor(p, device=device)
    plen = torch.tensor(lengths, device=device)[rows]  # [B*K]
    scores = torch.zeros(b, k, device=device)
    scores[:, 1:] = float("-inf")  # identical beams at first: only one of them may expand
    finished = torch.zeros(b * k, dtype=torch.bool, device=device)
    done_beams: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    cache = KVCache() if args.use_cache else None
    cur = min(lengths)
    logits = step_logits(seq[:, :cur], 0, cache, rows)  # [R, V]
    while cur < total:
        logp = F.log_softmax(logits.float() / args.temperature, dim=-1)  # [R, V]
        if args.min_new_tokens:
            logp[cur - plen < args.min_new_tokens, eot_token_id] = float("-inf")  # too early to end
        forced = cur < plen  # rows still reading their prompt
        if forced.any():
            forced_logp = torch.full_like(logp, float("-inf")).scatter(1, seq[:, cur : cur + 1], 0.0)
            logp = torch.where(forced[:, None], forced_logp, logp)
        if k > 1:
            seq, finished, scores, order = _beam_step(seq, logp, scores, finished, forced, cur, plen, done_beams, eot_token_id, args)
            if cache is not None:
                cache.reorder(order)
        else:
            if args.do_sample:
                probs = _filter_logits(logp, args.top_k, args.top_p).softmax(-1)
                on = generator.device if generator is not None else probs.device  # a CPU generator with a GPU model
                token = torch.multinomial(probs.to(on), 1, generator=generator).squeeze(1).to(probs.device)
            else:
                token = logp.argmax(-1)
            token = torch.where(finished, torch.zeros_like(token), token)
            seq[:, cur] = token
            finished |= ((token == eot_token_id) & ~forced) | (cur + 1 - plen >= args.max_new_tokens)
        cur += 1
        if cur == total or bool(finished.all()):
            break
        if cache is not None:
            logits = step_logits(seq[:, cur - 1 : cur], cur - 1, cache, rows)
        else:
            logits = step_logits(seq[:, :cur], 0, None, rows)
    if k > 1:
        return _best_beams(seq, scores, done_beams, plen, cur, k, args)
    out = []
    for i in range(b):
        new = seq[i, lengths[i] : cur].tolist()
        out.append(_until_eot(new, eot_token_id)[: args.max_new_tokens])
    return out


def _until_eot(tokens: list[int], eot: int) -> list[int]:
    return tokens[: tokens.index(eot)] if eot in tokens else tokens


def _beam_step(seq, logp, scores, finished, forced, cur, plen, done_beams, eot, args):
    """One beam-search step: expand every live beam, move beams ending in end-of-text (or at
    their token budget) to the finished lists, keep the K best live ones per prompt."""
    b, k = scores.shape
    v = logp.shape[-1]
    cand = (scores.view(-1, 1) + logp).view(b, k * v)  # [B, K*V]
    top_scores, top_idx = cand.topk(2 * k, dim=-1)  # [B, 2K]
    new_seq, new_scores = seq.clone(), torch.full_like(scores, float("-inf"))
    order = torch.arange(b * k, device=seq.device)
    for i in range(b):
        if finished[i * k]:  # this prompt is complete: keep its rows as they are
            continue
        kept = 0
        for score, idx in zip(top_scores[i].tolist(), top_idx[i].tolist()):
            if score == float("-inf"):
                break
            beam, token = divmod(idx, v)
            src = i * k + beam
            generated = cur + 1 - int(plen[src])
            if token == eot and not bool(forced[src]):
                done_beams[i].append((score / max(1, generated) ** args.length_penalty, seq[src, int(plen[src]) : cur].tolist()))
                continue
            dst = i * k + kept
            new_seq[dst] = seq[src]
            new_seq[dst, cur] = token
            new_scores[i, kept] = score
            order[dst] = src
            kept += 1
            if generated >= args.max_new_tokens:  # at its budget: finished as it is
                done_beams[i].append((score / max(1, generated) ** args.length_penalty, new_seq[dst, int(plen[src]) : cur + 1].tolist()))
            if kept == k:
                break
        best_live = new_scores[i].max().item()
        if kept == 0 or cur + 1 - int(plen[i * k]) >= args.max_new_tokens:
            finished[i * k : (i + 1) * k] = True  # every beam ended or reached its budget
        elif len(done_beams[i]) >= k:
            # HF's heuristic: stop when the best live beam, normalized now, does not beat the
            # k-th best finished one
            kth_done = sorted((s for s, _ in done_beams[i]), reverse=True)[k - 1]
            if best_live / (cur + 1 - int(plen[i * k])) ** args.length_penalty <= kth_done:
                finished[i * k : (i + 1) * k] = True
    return new_seq, finished, new_scores, order


def _best_beams(seq, scores, done_beams, plen, cur, k, args) -> list[list[int]]:
    out = []
    for i, done in enumerate(done_beams):
        if not done:  # nothing ended: the best live beam
            src = i * k + int(scores[i].argmax())
            done = [(0.0, seq[src, int(plen[src]) : cur].tolist())]
        out.append(max(done, key=lambda d: d[0])[1][: args.max_new_tokens])
    return out

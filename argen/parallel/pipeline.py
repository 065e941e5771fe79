"""Pipeline stages for DeepSpeed's PipelineModule, cut from the plain (possibly TP-swapped) GPT.

The layer list is  [Embed, Block_0 ... Block_{L-1}, Head]  and DeepSpeed partitions it uniformly over the blocks
(`partition_method="type:BlockStage"`, so each stage gets L/pp blocks; the first also holds the embeddings,
the last the final norm and output head). Between stages the activations travel as a tuple:
c2i `(x,)`; t2i `(x, cond_mask)` with the caption mask as int64, since DeepSpeed only back-propagates floating
point tensors and the mask needs no gradient. Each stage keeps the RoPE table and rebuilds the attention mask.

Inputs per micro-batch: `((codes, cond[, cond_mask]), (codes[, valid]))`, the second item being the loss labels.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from argen.model.gpt import GPT, TransformerBlock


class EmbedStage(nn.Module):
    def __init__(self, model: GPT):
        super().__init__()
        self.cls_embedding = model.cls_embedding
        self.tok_embeddings = model.tok_embeddings
        self.tok_dropout = model.tok_dropout
        self.cls_token_num = model.config.cls_token_num

    def forward(self, inputs):
        codes, cond = inputs[0], inputs[1]
        prefix = self.cls_embedding(cond)[:, : self.cls_token_num]
        x = self.tok_dropout(torch.cat([prefix, self.tok_embeddings(codes[:, :-1])], dim=1))
        if len(inputs) > 2:
            return x, inputs[2].long()
        return x


class BlockStage(nn.Module):
    """One transformer block; the wrapped block keeps its plain-model parameter objects."""

    def __init__(self, block: TransformerBlock, rope: torch.Tensor):
        super().__init__()
        self.block = block
        self.register_buffer("rope", rope, persistent=False)

    def forward(self, args):
        if isinstance(args, torch.Tensor):
            x, cond_mask = args, None
        else:
            x, cond_mask = args[0], args[1]
        S = x.shape[1]
        mask = GPT.prefix_mask(cond_mask, S) if cond_mask is not None else None
        y = self.block(x, self.rope[:S], mask)
        return y if cond_mask is None else (y, cond_mask)


class HeadStage(nn.Module):
    def __init__(self, model: GPT):
        super().__init__()
        self.norm = model.norm
        self.output = model.output
        self.cls_token_num = model.config.cls_token_num

    def forward(self, args):
        x = args if isinstance(args, torch.Tensor) else args[0]
        return self.output(self.norm(x[:, self.cls_token_num - 1:])).float()


def stage_layers(model: GPT) -> list[nn.Module]:
    return [EmbedStage(model)] + [BlockStage(b, model.rope) for b in model.layers] + [HeadStage(model)]


def build_pipeline(model: GPT, layout, loss_fn) -> nn.Module:
    """A DeepSpeed PipelineModule over this rank's stage, with the topology matching megatron's groups."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topo = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
    return PipelineModule(layers=stage_layers(model), topology=topo, loss_fn=loss_fn,
                          partition_method="type:BlockStage", activation_checkpoint_interval=0)

"""Mode B under DeepSpeed: an ``mpu`` that makes one agent DeepSpeed's data-parallel group."""

from __future__ import annotations

import torch.distributed as dist


class AgentMPU:
    """A DeepSpeed ``mpu`` that makes an agent (``topology.shard_group``) DeepSpeed's data-parallel group, so ZeRO
    shards and averages only inside an agent, and the ranks holding the same shard in different agents
    (``topology.agent_group``) its "model-parallel" group, where PISA's consensus runs (mode B).

    Experimental (see docs/deepspeed.md "Mode B"): DeepSpeed believes the agent dimension is tensor parallelism.
    """

    def __init__(self, topology):
        self.topology = topology

    # data parallel = inside one agent
    def get_data_parallel_group(self):
        return self.topology.shard_group

    def get_data_parallel_world_size(self):
        return self.topology.shard_size

    def get_data_parallel_rank(self):
        return self.topology.shard_index

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.topology.shard_group)

    # "model parallel" = across agents
    def get_model_parallel_group(self):
        return self.topology.agent_group

    def get_model_parallel_world_size(self):
        return self.topology.agents

    def get_model_parallel_rank(self):
        return self.topology.agent_index

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self):
        return dist.get_process_group_ranks(self.topology.agent_group)[0]

    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_rank(self):
        return 0

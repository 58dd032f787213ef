"""A Grid that runs a federation inside one process: each message goes straight to the ClientApp, with one
Context per node that lives as long as the grid (as a SuperNode's does for a run).

For studies and tests that want the apps' exact behaviour without a SuperLink, Ray or subprocesses.
A ClientApp exception becomes an error reply, as Flower's runtimes turn it into one.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

FIRST_NODE_ID = 100


class InProcessGrid(Grid):
    """Nodes ``FIRST_NODE_ID + i`` with node config ``partition-id = i``, ``num-partitions = num_nodes``."""

    def __init__(self, client_app: ClientApp, run_config: dict, num_nodes: int) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.client_app = client_app
        self.contexts = {
            FIRST_NODE_ID + i: Context(run_id=1, node_id=FIRST_NODE_ID + i, state=RecordDict(), run_config=run_config,
                                       node_config={"partition-id": i, "num-partitions": num_nodes})
            for i in range(num_nodes)
        }
        # Messages take their sender from the process's task identity, which Flower sets in a ServerApp
        # process; here this process is the server (as in Flower's own in-process simulation API).
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID

    def deliver(self, message: Message) -> Message | None:
        """The node's reply to ``message`` (None: no reply)."""
        try:
            return self.client_app(message, self.contexts[message.metadata.dst_node_id])
        except Exception as error:  # the runtimes report any ClientApp exception as an error reply
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(error).__name__}: {error}"),
                           reply_to=message)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return [reply for message in messages if (reply := self.deliver(message)) is not None]

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def set_run(self, run) -> None:
        raise NotImplementedError("an in-process grid has no SuperLink run")

    @property
    def run(self):
        raise NotImplementedError("an in-process grid has no SuperLink run")

    def push_messages(self, messages):
        raise NotImplementedError("an in-process grid delivers with send_and_receive")

    def pull_messages(self, message_ids):
        raise NotImplementedError("an in-process grid delivers with send_and_receive")

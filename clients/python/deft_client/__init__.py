"""deft-client: Python client of deft-serve (tree-structured LLM decoding over gRPC).

    from deft_client import DeftClient
    with DeftClient("localhost:50051") as c:
        tree = c.create_tree("The oldest trees")
        kids = c.fork(tree.tree_id, tree.root_node_id, tree.prompt_tokens, count=2).node_ids
        for event in c.generate(tree.tree_id, kids, max_tokens=16, temperature=0.7, seed=1):
            print(event)

The raw gRPC stubs are deft_client.proto.{tree,model}_service_pb2[_grpc], generated from
proto/deft/v1 when the package is built.
"""
from deft_client.client import (Beam, Branch, CreatedTree, DeftClient, DeftError, Finish, Forked,
                                GenerateStream, ModelInfo, Node, Sampling, Token, Tree,
                                TreeSummary, Verified)

__all__ = ["Beam", "Branch", "CreatedTree", "DeftClient", "DeftError", "Finish", "Forked",
           "GenerateStream", "ModelInfo", "Node", "Sampling", "Token", "Tree", "TreeSummary",
           "Verified"]

"""A smartdb client in Python, with stubs generated from proto/ by grpcio-tools.

Usage: SMARTDB_API_KEY=... client.py GATEWAY_ADDR STUB_DIR KNOWLEDGE_BASE QUERY
Creates nothing; searches KNOWLEDGE_BASE for QUERY and prints the first hit's source name.
"""

import os
import sys

sys.path.insert(0, sys.argv[2])

import grpc  # noqa: E402
from smartdb.v1 import search_pb2, search_pb2_grpc  # noqa: E402
from smartdb.v1 import knowledge_base_pb2, knowledge_base_pb2_grpc  # noqa: E402

addr, _, kb, query = sys.argv[1:5]


class ApiKey(grpc.UnaryUnaryClientInterceptor):
    """Sends the API key on every call, as `authorization: Bearer <key>`."""

    def __init__(self, key):
        self.header = ("authorization", f"Bearer {key}")

    def intercept_unary_unary(self, continuation, details, request):
        metadata = list(details.metadata or []) + [self.header]
        return continuation(details._replace(metadata=metadata), request)


with grpc.intercept_channel(grpc.insecure_channel(addr), ApiKey(os.environ["SMARTDB_API_KEY"])) as channel:
    kbs = knowledge_base_pb2_grpc.KnowledgeBaseServiceStub(channel)
    got = kbs.GetKnowledgeBase(knowledge_base_pb2.GetKnowledgeBaseRequest(name=kb), timeout=10)
    assert got.knowledge_base.name == kb, got
    search = search_pb2_grpc.SearchServiceStub(channel)
    response = search.Search(search_pb2.SearchRequest(knowledge_base=kb, query=query, top_k=3), timeout=30)
    print(response.hits[0].source_name)
    try:
        search.Search(search_pb2.SearchRequest(knowledge_base=kb, query=""), timeout=10)
        raise SystemExit("empty query was accepted")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err

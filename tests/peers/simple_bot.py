#!/usr/bin/env python3
"""The simplest useful BuildGrid bot, the peer casfs workers are measured against.

It does what BuildGrid's old host-tools bot did: for each lease, download the whole input
root into a fresh folder, run the command there on the host (no sandbox), upload the
outputs, stdout and stderr, and complete the lease with the ActionResult. One lease at a
time; start several processes for parallelism. Uses only BuildGrid's own generated protos
and grpcio from BuildGrid's venv.

    simple_bot.py --remote http://127.0.0.1:PORT [--instance-name N] [--bot-id ID]
"""

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import grpc
from buildgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re
from buildgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildgrid._protos.google.bytestream import bytestream_pb2 as bs
from buildgrid._protos.google.bytestream import bytestream_pb2_grpc as bs_grpc
from buildgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2, bots_pb2_grpc
from buildgrid._protos.google.rpc import code_pb2, status_pb2

BATCH = 2 << 20  # bytes per BatchRead/BatchUpdate request
STOP = False


def digest_of(data):
    return re.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


class Cas:
    def __init__(self, channel, instance):
        self.cas = re_grpc.ContentAddressableStorageStub(channel)
        self.bs = bs_grpc.ByteStreamStub(channel)
        self.instance = instance

    def _prefix(self):
        return f"{self.instance}/" if self.instance else ""

    def read_many(self, digests):
        out, batch, size = {}, [], 0
        for d in digests:
            if d.size_bytes > BATCH:
                name = f"{self._prefix()}blobs/{d.hash}/{d.size_bytes}"
                out[d.hash] = b"".join(r.data for r in self.bs.Read(bs.ReadRequest(resource_name=name)))
                continue
            if size + d.size_bytes > BATCH and batch:
                self._batch_read(batch, out)
                batch, size = [], 0
            batch.append(d)
            size += d.size_bytes
        if batch:
            self._batch_read(batch, out)
        return out

    def _batch_read(self, digests, out):
        req = re.BatchReadBlobsRequest(instance_name=self.instance, digests=digests)
        for r in self.cas.BatchReadBlobs(req).responses:
            if r.status.code != 0:
                raise RuntimeError(f"missing blob {r.digest.hash}/{r.digest.size_bytes}")
            out[r.digest.hash] = r.data

    def write_many(self, blobs):
        """blobs: {hash: (Digest, bytes)}; only what the CAS lacks is sent."""
        if not blobs:
            return
        missing = self.cas.FindMissingBlobs(
            re.FindMissingBlobsRequest(instance_name=self.instance, blob_digests=[d for d, _ in blobs.values()])
        ).missing_blob_digests
        batch, size = [], 0
        for d in missing:
            data = blobs[d.hash][1]
            if d.size_bytes > BATCH:
                name = f"{self._prefix()}uploads/{uuid.uuid4()}/blobs/{d.hash}/{d.size_bytes}"
                chunks = [data[i:i + BATCH] for i in range(0, len(data), BATCH)] or [b""]
                reqs = (
                    bs.WriteRequest(resource_name=name if i == 0 else "", write_offset=i * BATCH, data=c,
                                    finish_write=i == len(chunks) - 1)
                    for i, c in enumerate(chunks)
                )
                self.bs.Write(reqs)
                continue
            if size + d.size_bytes > BATCH and batch:
                self.cas.BatchUpdateBlobs(re.BatchUpdateBlobsRequest(instance_name=self.instance, requests=batch))
                batch, size = [], 0
            batch.append(re.BatchUpdateBlobsRequest.Request(digest=d, data=data))
            size += d.size_bytes
        if batch:
            self.cas.BatchUpdateBlobs(re.BatchUpdateBlobsRequest(instance_name=self.instance, requests=batch))


def fetch_tree(cas, root_digest, dest):
    """Writes the whole tree of root_digest under dest, level by level."""
    level = [(root_digest, dest)]
    while level:
        blobs = cas.read_many([d for d, _ in level])
        files, nxt = [], []
        for d, path in level:
            directory = re.Directory.FromString(blobs[d.hash])
            os.makedirs(path, exist_ok=True)
            for f in directory.files:
                files.append((f, os.path.join(path, f.name)))
            for s in directory.symlinks:
                os.symlink(s.target, os.path.join(path, s.name))
            for sub in directory.directories:
                nxt.append((sub.digest, os.path.join(path, sub.name)))
        data = cas.read_many({f.digest.hash: f.digest for f, _ in files}.values())
        for f, path in files:
            with open(path, "wb") as fh:
                fh.write(data[f.digest.hash])
            os.chmod(path, 0o755 if f.is_executable else 0o644)
        level = nxt


def directory_of(path, blobs, children):
    """The Directory message of a local folder; its files and sub-Directories go to blobs/children."""
    d = re.Directory()
    for name in sorted(os.listdir(path)):
        p = os.path.join(path, name)
        if os.path.islink(p):
            d.symlinks.add(name=name, target=os.readlink(p))
        elif os.path.isdir(p):
            sub = directory_of(p, blobs, children)
            data = sub.SerializeToString()
            dg = digest_of(data)
            children[dg.hash] = sub
            blobs[dg.hash] = (dg, data)
            d.directories.add(name=name, digest=dg)
        else:
            with open(p, "rb") as fh:
                data = fh.read()
            dg = digest_of(data)
            blobs[dg.hash] = (dg, data)
            d.files.add(name=name, digest=dg, is_executable=os.access(p, os.X_OK))
    return d


def run_action(cas, action, workdir):
    command = re.Command.FromString(cas.read_many([action.command_digest])[action.command_digest.hash])
    root = os.path.join(workdir, "root")
    fetch_tree(cas, action.input_root_digest, root)
    cwd = os.path.join(root, command.working_directory)
    paths = list(command.output_paths) or list(command.output_files) + list(command.output_directories)
    for p in paths:
        os.makedirs(os.path.dirname(os.path.join(cwd, p)), exist_ok=True)
    env = {v.name: v.value for v in command.environment_variables}
    argv = list(command.arguments)
    if "/" not in argv[0]:
        for entry in env.get("PATH", "").split(":"):
            cand = os.path.join(entry if entry.startswith("/") else os.path.join(cwd, entry), argv[0])
            if os.path.isfile(cand):
                argv[0] = cand
                break
    timeout = action.timeout.seconds or None
    with open(os.path.join(workdir, "out"), "wb") as out, open(os.path.join(workdir, "err"), "wb") as err:
        try:
            code = subprocess.run(argv, cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = -1
    result, blobs = re.ActionResult(exit_code=code), {}
    for name in ("out", "err"):
        with open(os.path.join(workdir, name), "rb") as fh:
            data = fh.read()
        dg = digest_of(data)
        blobs[dg.hash] = (dg, data)
        (result.stdout_digest if name == "out" else result.stderr_digest).CopyFrom(dg)
    for p in paths:
        full = os.path.join(cwd, p)
        if os.path.islink(full):
            result.output_symlinks.add(path=p, target=os.readlink(full))
        elif os.path.isdir(full):
            children = {}
            root_dir = directory_of(full, blobs, children)
            tree = re.Tree(root=root_dir, children=list(children.values()))
            data = tree.SerializeToString()
            dg = digest_of(data)
            blobs[dg.hash] = (dg, data)
            result.output_directories.add(path=p, tree_digest=dg)
        elif os.path.isfile(full):
            with open(full, "rb") as fh:
                data = fh.read()
            dg = digest_of(data)
            blobs[dg.hash] = (dg, data)
            result.output_files.add(path=p, digest=dg, is_executable=os.access(full, os.X_OK))
    cas.write_many(blobs)
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--remote", required=True)
    ap.add_argument("--instance-name", default="")
    ap.add_argument("--bot-id", default=f"simple-bot-{os.getpid()}")
    args = ap.parse_args()
    channel = grpc.insecure_channel(args.remote.replace("http://", "").replace("grpc://", ""))
    bots = bots_pb2_grpc.BotsStub(channel)
    cas = Cas(channel, args.instance_name)

    def stop(*_):
        global STOP
        STOP = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    session = bots.CreateBotSession(bots_pb2.CreateBotSessionRequest(
        parent=args.instance_name,
        bot_session=bots_pb2.BotSession(bot_id=args.bot_id, status=bots_pb2.BotStatus.OK),
    ))
    print(f"simple-bot {args.bot_id}: session {session.name}", flush=True)
    while not STOP:
        try:
            session = bots.UpdateBotSession(bots_pb2.UpdateBotSessionRequest(name=session.name, bot_session=session),
                                            timeout=30)
        except grpc.RpcError as e:
            print(f"simple-bot: UpdateBotSession: {e.code()}", file=sys.stderr, flush=True)
            time.sleep(1)
            continue
        for lease in session.leases:
            # BuildGrid hands leases out already ACTIVE; others start them PENDING.
            if lease.state not in (bots_pb2.LeaseState.PENDING, bots_pb2.LeaseState.ACTIVE):
                continue
            lease.state = bots_pb2.LeaseState.ACTIVE
            action = re.Action()
            if not lease.payload.Unpack(action):
                dg = re.Digest()
                lease.payload.Unpack(dg)
                action = re.Action.FromString(cas.read_many([dg])[dg.hash])
            with tempfile.TemporaryDirectory(prefix="simple-bot-") as workdir:
                try:
                    result = run_action(cas, action, workdir)
                    lease.result.Pack(result)
                    lease.status.CopyFrom(status_pb2.Status(code=code_pb2.OK))
                except Exception as e:  # an infrastructure failure, reported as such
                    lease.status.CopyFrom(status_pb2.Status(code=code_pb2.UNAVAILABLE, message=str(e)))
            lease.state = bots_pb2.LeaseState.COMPLETED
    session.status = bots_pb2.BotStatus.BOT_TERMINATING
    try:
        bots.UpdateBotSession(bots_pb2.UpdateBotSessionRequest(name=session.name, bot_session=session), timeout=10)
    except grpc.RpcError:
        pass


if __name__ == "__main__":
    main()

"""The privacy steps a job worker sends on its Work stream (`WorkerMessage.privacy`), each handed to the part
of the running job that keeps that protocol: the job's HE key (fedserver/job_keys.py) or the SecAgg+ round in
progress (fedserver/secure_rounds.py). The answer waits until the step closes for every site."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedgrid.errors import StateError
from fedgrid.v1 import federation_pb2 as fpb

if TYPE_CHECKING:
    from fedserver.jobrun import JobRun


async def answer(run: JobRun, site: str, request: fpb.PrivacyRequest) -> fpb.PrivacyReply:
    """The server's answer to one privacy step of `site` in `run`; a FedgridError refuses it with the reason."""
    if request.job_id and request.job_id != run.job_id:
        raise StateError(f"a privacy step for job {request.job_id} on the stream of job {run.job_id}")
    kind = request.WhichOneof("kind")
    if kind in ("job_key", "key_offer"):
        if run.keys is None:
            raise StateError(f"job {run.job_id} does not have its HE key made at a site")
        if kind == "job_key":
            return fpb.PrivacyReply(job_key=await run.keys.request(site, request.job_key.cert_pem))
        run.keys.offer(site, request.key_offer)
        return fpb.PrivacyReply(done="key taken")
    if run.secure is None:
        raise StateError(f"job {run.job_id} does not use secure aggregation")
    if kind == "advertise":
        aggregator = run.secure.round_of(request.advertise.task_id)
        return fpb.PrivacyReply(keys=await aggregator.advertise(site, request.advertise))
    if kind == "shares":
        aggregator = run.secure.round_of(request.shares.task_id)
        return fpb.PrivacyReply(inbox=await aggregator.share(site, request.shares))
    if kind == "unmask":
        aggregator = run.secure.round_of(request.unmask.task_id)
        return fpb.PrivacyReply(survivors=await aggregator.unmask_request(site))
    if kind == "reveal":
        aggregator = run.secure.round_of(request.reveal.task_id)
        await aggregator.reveal(site, request.reveal)
        return fpb.PrivacyReply(done="shares taken")
    raise StateError(f"an empty or unknown privacy step from {site}")

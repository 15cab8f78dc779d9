"""Do-nothing ``/predict``: drains the request body and returns a canned one-input answer.

It never decodes the body or runs a model, so its throughput is what the load generator itself can
push through HTTP here: the ceiling any real server is measured against. Raw ASGI on uvicorn keeps
the server's share of the CPU as small as it gets. The answer is class 0, uniform over the model's
labels (no outputs for a model that is not a classifier).

    python -m loadtest.baselines.do_nothing --model artifacts/model.onnx --port 3002
"""
import argparse
import asyncio
import json

from loadtest.workload import LABELS, metadata_of

STATE = {"answer": b"", "headers": [], "delay_s": 0.0}  # set once by main()


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        return await send({"type": "lifespan.shutdown.complete"})
    more = True
    while more:  # drain the body, as any real server must
        more = (await receive()).get("more_body", False)
    if STATE["delay_s"]:
        await asyncio.sleep(STATE["delay_s"])
    await send({"type": "http.response.start", "status": 200, "headers": STATE["headers"]})
    await send({"type": "http.response.body", "body": STATE["answer"]})


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m loadtest.baselines.do_nothing", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="", help="contract ONNX file whose labels the answer uses ('' = Fashion-MNIST's)")
    ap.add_argument("--port", type=int, default=3002, help="port to listen on (127.0.0.1)")
    ap.add_argument("--workers", "--threads", type=int, help="ignored: one process (what the bench passes every server)")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="wait this long before each answer (tests of p99)")
    args = ap.parse_args()
    labels = metadata_of(args.model)["labels"] if args.model else LABELS
    answer = json.dumps({"predictions": [{"label": labels[0], "class_id": 0, "probabilities": [1 / len(labels)]
                                          * len(labels)}]} if labels else {"outputs": {}}, separators=(",", ":")).encode()
    STATE.update(answer=answer, delay_s=max(args.delay_ms, 0.0) / 1000.0,
                 headers=[(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())])
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()

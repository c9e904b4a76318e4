"""Command line: `distinfer generate "prompt"` streams a completion to stdout; `distinfer serve [MODEL]`
runs the OpenAI HTTP and gRPC APIs; `distinfer bench` sends a Poisson load to a running server."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from distinfer.router.policies import DEFAULT_DISPATCH_POLICY, dispatch_policy_names
from distinfer.router.rebalance import migration_policy_names
from distinfer.sampling_params import SamplingParams
from distinfer.serving.limits import ServerLimits


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when a GPU is visible, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--attention-backend", default="auto",
                        help="auto (triton on CUDA, the C kernels on the CPU), triton, torch_sdpa or cpu_paged")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="CUDA: fraction of the GPU's memory for weights, activations and KV blocks")
    parser.add_argument("--kv-cache-bytes", type=int, default=2 << 30, help="CPU: bytes of KV blocks")
    parser.add_argument("--kv-offloading-size", type=float, default=0.0,
                        help="GiB of host DRAM for a second KV tier (preempted requests swap there); 0 = none")
    parser.add_argument("--preemption-mode", default="auto",
                        help="auto (swap when there is a host KV tier, else recompute), swap or recompute")
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    parser.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1)
    parser.add_argument("-sp", "--sequence-parallel-size", type=int, default=1,
                        help="sequence parallel ranks sharing each prompt's tokens (world size: tp x pp x sp)")
    parser.add_argument("--pipeline-layer-partition", default=None,
                        help="layers per pipeline stage, e.g. 17,13 (default: even split)")
    parser.add_argument("--seed", type=int, default=0, help="engine seed (unseeded sampling)")
    parser.add_argument("--max-pending-requests", type=int, default=4096,
                        help="requests admitted and unfinished at once; more get 429 / RESOURCE_EXHAUSTED")
    parser.add_argument("--step-timeout", type=float, default=120.0,
                        help="seconds one engine step may take before the engine is declared hung and dead")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        device=args.device,
        dtype=args.dtype,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_bytes=args.kv_cache_bytes,
        kv_offloading_size=args.kv_offloading_size,
        preemption_mode=args.preemption_mode,
        load_format=args.load_format,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        enable_prefix_caching=not args.no_prefix_caching,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        sequence_parallel_size=args.sequence_parallel_size,
        pipeline_layer_partition=args.pipeline_layer_partition,
        seed=args.seed,
        max_waiting_requests=args.max_pending_requests,
        step_timeout_s=args.step_timeout,
    )


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--min-tokens", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--presence-penalty", type=float, default=0.0)
    parser.add_argument("--frequency-penalty", type=float, default=0.0)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        min_tokens=args.min_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.sampling_seed,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from distinfer.engine.engine import LLMEngine
    from distinfer.engine.llm import build_config
    from distinfer.engine.output_processor import RequestOutputKind

    try:
        params = sampling_params_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine = LLMEngine(build_config(args.model, **engine_kwargs(args)))
    prompt = args.prompt
    if args.chat:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    try:
        engine.add_request("cli-0", prompt, params, output_kind=RequestOutputKind.DELTA)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finish_reason = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            sys.stdout.write(output.outputs[0].text)
            sys.stdout.flush()
            finish_reason = output.outputs[0].finish_reason or finish_reason
    sys.stdout.write("\n")
    logging.getLogger("distinfer.cli").info("finish_reason=%s", finish_reason)
    engine.shutdown()
    return 0


_LIMIT_HELP = {
    "max_body_bytes": "HTTP request body bound; larger bodies get 413 before they are parsed",
    "max_header_bytes": "HTTP request line + headers bound; larger get 431",
    "max_http_connections": "HTTP connections at once; more get 503",
    "max_prompt_chars": "characters of one prompt or Tokenize text (default: the longest text the context "
                        "could hold, max_model_len x the longest token)",
    "grpc_max_message_bytes": "gRPC message size bound (RESOURCE_EXHAUSTED above)",
    "grpc_max_concurrent_rpcs": "gRPC calls in progress at once on the server (RESOURCE_EXHAUSTED above)",
    "grpc_max_concurrent_streams": "gRPC streams per connection (HTTP/2 SETTINGS; clients queue beyond it)",
    "grpc_keepalive_time_s": "seconds between the server's keepalive pings (finds half-open clients)",
    "grpc_keepalive_timeout_s": "seconds a ping may go unanswered before the connection and its calls end",
    "grpc_max_connection_age_s": "seconds after which a gRPC connection is asked to reconnect (rebalancing)",
    "grpc_max_connection_age_grace_s": "seconds calls in flight get after max connection age",
}


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_path", nargs="?", default=None, metavar="MODEL", help="same as --model")
    parser.add_argument("--served-model-name", default=None, help="name clients use (default: the model directory's name)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface for both APIs (default: loopback only; 0.0.0.0 serves every interface)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=50051, help="-1 disables the gRPC API")
    parser.add_argument("--api-key-file", default=None,
                        help="file whose first line is the key clients must send as `Authorization: Bearer KEY` "
                             "(or env DISTINFER_API_KEY / DISTINFER_API_KEY_FILE)")
    parser.add_argument("--api-key", default=None, help="the key itself (visible to every user in `ps`: prefer "
                        "--api-key-file or DISTINFER_API_KEY)")
    parser.add_argument("--require-api-key", action="store_true", help="refuse to start without an API key")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate: serve both APIs over TLS")
    parser.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    parser.add_argument("--drain-timeout", type=float, default=25.0,
                        help="seconds the whole shutdown may take (fit it inside the pod's termination grace period); "
                             "requests still running then are cut with a retryable error")
    parser.add_argument("--instances", type=int, default=1,
                        help="engine instances behind a router, each with the engine arguments below (its own "
                             "tp x pp workers and KV cache); 1 (default) serves one engine in this process")
    parser.add_argument("--dispatch-policy", default=None, choices=dispatch_policy_names(),
                        help=f"how the router places new requests (needs --instances > 1; default "
                             f"{DEFAULT_DISPATCH_POLICY}): least_load (lowest virtual KV usage) or round_robin")
    parser.add_argument("--migration-policy", default=None, choices=migration_policy_names(),
                        help="live migrations the router starts on its own (needs --instances > 1; default none): "
                             "balance (from the most to the least loaded instance) or defrag (room for a queued "
                             "request that does not fit)")
    parser.add_argument("--migration-transport", default="object_store", choices=["object_store", "p2p"],
                        help="how KV moves between instances: object_store (Ray's, any topology; default) or p2p "
                             "(a gloo link from each source rank to the same destination rank)")
    parser.add_argument("--prefill-instances", type=int, default=0,
                        help="prefill/decode disaggregation: instances that take new requests (prompt and first token); "
                             "each request then moves to one of the --decode-instances, chosen by load")
    parser.add_argument("--decode-instances", type=int, default=0,
                        help="prefill/decode disaggregation: instances that decode requests handed over after their first "
                             "token (give both; together they are all the instances)")
    for f in dataclasses.fields(ServerLimits):
        kind = float if f.name.endswith("_s") else int
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                            help=f"{_LIMIT_HELP[f.name]} (default: {f.default})")


def server_limits(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerLimits)})


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from distinfer.serving.auth import resolve_api_key
    from distinfer.serving.server import DistInferServer, ServeOptions, run_server

    if bool(args.tls_cert) != bool(args.tls_key):
        print("error: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    try:
        api_key = resolve_api_key(args.api_key, args.api_key_file)
        options = ServeOptions(
            model=args.model_path or args.model, engine_kwargs=engine_kwargs(args),
            served_model_name=args.served_model_name, host=args.host, http_port=args.http_port,
            grpc_port=None if args.grpc_port < 0 else args.grpc_port, api_key=api_key, tls_cert_file=args.tls_cert,
            tls_key_file=args.tls_key, drain_timeout_s=args.drain_timeout, limits=server_limits(args),
            log_level=args.log_level.lower(), num_instances=args.instances, dispatch_policy=args.dispatch_policy,
            prefill_instances=args.prefill_instances, decode_instances=args.decode_instances,
            migration_policy=args.migration_policy, migration_transport=args.migration_transport)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.require_api_key and api_key is None:
        print("error: --require-api-key: give --api-key-file, DISTINFER_API_KEY or DISTINFER_API_KEY_FILE", file=sys.stderr)
        return 2
    if args.api_key is not None:
        logging.getLogger("distinfer.cli").warning("--api-key is visible to every user of this machine in `ps`; "
                                                   "prefer --api-key-file or DISTINFER_API_KEY")

    def ready(server: DistInferServer) -> None:
        scheme = "https" if options.tls_cert_file else "http"
        grpc = f", gRPC on {options.host}:{server.grpc_port}" if server.grpc_port else ""
        print(f"distinfer: serving {options.model_name}: HTTP on {scheme}://{options.host}:{server.http_port}/v1{grpc}", flush=True)

    return asyncio.run(run_server(options, on_ready=ready))


def cmd_bench(args: argparse.Namespace) -> int:
    import asyncio

    from distinfer.serving.loadgen import LoadSpec, format_report, run_load

    spec = LoadSpec(protocol=args.protocol, target=args.target, model=args.served_model_name, rate=args.rate,
                    num_requests=args.num_requests, input_len=args.input_len, output_len=args.output_len,
                    api_key=args.api_key, seed=args.seed, ttft_slo_s=args.ttft_slo, tpot_slo_s=args.tpot_slo)
    print(format_report(asyncio.run(run_load(spec))))
    return 0


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    parser.add_argument("--target", default=None, help="http://HOST:PORT or HOST:PORT (default: the serve defaults)")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--rate", type=float, default=1.0, help="Poisson arrival rate, requests/s (inf: all at once)")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=64, help="prompt tokens (random ids)")
    parser.add_argument("--output-len", type=int, default=32, help="tokens generated per request (ignore_eos)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ttft-slo", type=float, default=1.0, help="goodput SLO on time to first token, seconds")
    parser.add_argument("--tpot-slo", type=float, default=0.2, help="goodput SLO on time per output token, seconds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distinfer", description="Distributed LLM inference runtime")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream a completion for one prompt to stdout")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API and the gRPC API")
    add_serve_args(serve)
    add_engine_args(serve)
    serve.set_defaults(func=cmd_serve)
    bench = sub.add_parser("bench", help="Poisson load against a running server: TTFT/TPOT/ITL/latency, goodput")
    add_bench_args(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

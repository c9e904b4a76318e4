{{/* Names and labels. */}}
{{- define "distinfer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "distinfer.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "distinfer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "distinfer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "distinfer.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "distinfer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The Service clients use: KubeRay's serve service (rayservice) or the Deployment's. */}}
{{- define "distinfer.serviceName" -}}
{{- include "distinfer.fullname" . }}
{{- end -}}

{{- define "distinfer.apiKeySecret" -}}
{{- default (printf "%s-api-key" (include "distinfer.fullname" .)) .Values.apiKey.existingSecret -}}
{{- end -}}

{{/* The model argument: "" means distinfer's default model. With `models`, the single model is unused. */}}
{{- define "distinfer.modelPath" -}}
{{- if not .Values.models -}}
{{- include "distinfer.modelPathOf" (dict "model" .Values.model "path" .Values.model.path) -}}
{{- end -}}
{{- end -}}

{{/* A model's path under model.source: (dict "model" .Values.model "path" path). */}}
{{- define "distinfer.modelPathOf" -}}
{{- $m := .model -}}
{{- if eq $m.source "image" -}}
{{- .path -}}
{{- else if .path -}}
{{- printf "%s/%s" (trimSuffix "/" $m.mountPath) (trimPrefix "/" .path) -}}
{{- else -}}
{{- $m.mountPath -}}
{{- end -}}
{{- end -}}

{{/* Every model path the init container prepares ("" = distinfer's default model). */}}
{{- define "distinfer.modelPaths" -}}
{{- $paths := list -}}
{{- if .Values.models -}}
{{- range .Values.models -}}
{{- $paths = append $paths (include "distinfer.modelPathOf" (dict "model" $.Values.model "path" .path)) -}}
{{- end -}}
{{- else -}}
{{- $paths = append $paths (include "distinfer.modelPath" .) -}}
{{- end -}}
{{- toJson $paths -}}
{{- end -}}

{{- define "distinfer.worldSize" -}}
{{- mul .Values.engine.tensorParallelSize .Values.engine.pipelineParallelSize .Values.engine.sequenceParallelSize -}}
{{- end -}}

{{/* Settings that cannot work together fail the render with a message. */}}
{{- define "distinfer.validate" -}}
{{- $m := .Values.model -}}
{{- if and (eq $m.source "pvc") (not $m.pvc.claimName) -}}
{{- fail "model.source=pvc needs model.pvc.claimName" -}}
{{- end -}}
{{- if and (eq $m.source "hostPath") (not $m.hostPath.path) -}}
{{- fail "model.source=hostPath needs model.hostPath.path" -}}
{{- end -}}
{{- if and (eq $m.source "image") $m.path (not (hasPrefix "/" $m.path)) -}}
{{- fail "model.source=image needs an absolute model.path (or \"\" for the default model)" -}}
{{- end -}}
{{- $r := .Values.router -}}
{{- $pd := add $r.prefillInstances $r.decodeInstances -}}
{{- if and (gt (int $pd) 0) (or (lt (int $r.prefillInstances) 1) (lt (int $r.decodeInstances) 1)) -}}
{{- fail "router: prefill/decode disaggregation needs prefillInstances >= 1 and decodeInstances >= 1" -}}
{{- end -}}
{{- if and (gt (int $pd) 0) (ne (int $r.instances) 1) (ne (int $r.instances) (int $pd)) -}}
{{- fail "router.instances must be 1 or prefillInstances + decodeInstances" -}}
{{- end -}}
{{- $instances := max (int $r.instances) (int $pd) -}}
{{- if and (eq $instances 1) (or $r.dispatchPolicy $r.migrationPolicy) -}}
{{- fail "router.dispatchPolicy / router.migrationPolicy need more than one instance (router.instances > 1)" -}}
{{- end -}}
{{- if and .Values.serve.acceleratorType (or (ne .Values.engine.device "cuda") (gt $instances 1)) -}}
{{- fail "serve.acceleratorType needs engine.device=cuda and one instance per replica" -}}
{{- end -}}
{{- if and .Values.tls.secretName (eq .Values.mode "rayservice") (not .Values.ingress.enabled) -}}
{{- fail "tls.secretName in rayservice mode is used by the Ingress (Serve's proxies have no TLS): set ingress.enabled" -}}
{{- end -}}
{{- if and (eq .Values.mode "deployment") .Values.networkPolicy.dashboardFrom -}}
{{- fail "networkPolicy.dashboardFrom is Ray's dashboard: mode: rayservice only" -}}
{{- end -}}
{{- include "distinfer.validateModels" . -}}
{{- if and .Values.grpcRoute.enabled (not .Values.grpcRoute.parentRefs) -}}
{{- fail "grpcRoute.enabled needs grpcRoute.parentRefs (the Gateway)" -}}
{{- end -}}
{{- if eq .Values.engine.device "cuda" -}}
{{- $rank := mul .Values.engine.tensorParallelSize .Values.engine.sequenceParallelSize -}}
{{- if eq .Values.mode "rayservice" -}}
{{- range .Values.ray.workerGroups -}}
{{- if lt (int .gpus) (int $rank) -}}
{{- fail (printf "ray.workerGroups[%s].gpus=%v cannot hold tensorParallelSize x sequenceParallelSize = %v GPUs of one replica on one node" .name .gpus $rank) -}}
{{- end -}}
{{- end -}}
{{- else if lt (int .Values.deployment.gpus) (mul (int (include "distinfer.worldSize" .)) $instances) -}}
{{- fail "deployment.gpus must cover tp x pp x sp x instances with engine.device=cuda" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* `models`: several models in one application (rayservice mode; each entry names its own path). */}}
{{- define "distinfer.validateModels" -}}
{{- if .Values.models -}}
{{- if eq .Values.mode "deployment" -}}
{{- fail "models (several models in one application) needs mode: rayservice" -}}
{{- end -}}
{{- if or .Values.model.path .Values.model.servedModelName -}}
{{- fail "model.path / model.servedModelName describe the single model: with models set, give each entry its path and servedModelName" -}}
{{- end -}}
{{- $names := dict -}}
{{- range .Values.models -}}
{{- if hasKey $names .servedModelName -}}
{{- fail (printf "models: servedModelName %q is used twice" .servedModelName) -}}
{{- end -}}
{{- $_ := set $names .servedModelName true -}}
{{- if and (eq $.Values.model.source "image") .path (not (hasPrefix "/" .path)) -}}
{{- fail (printf "models[%s]: model.source=image needs an absolute path (or \"\" for the default model)" .servedModelName) -}}
{{- end -}}
{{- if and (eq $.Values.engine.device "cuda") (eq $.Values.mode "rayservice") -}}
{{- $rank := mul (default $.Values.engine.tensorParallelSize .tensorParallelSize) (default $.Values.engine.sequenceParallelSize .sequenceParallelSize) -}}
{{- range $.Values.ray.workerGroups -}}
{{- if lt (int .gpus) (int $rank) -}}
{{- fail (printf "ray.workerGroups[%s].gpus=%v cannot hold a model's tensorParallelSize x sequenceParallelSize = %v GPUs on one node" .name .gpus $rank) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The application's args: ServeAppArgs (distinfer/serving/ray_serve.py). */}}
{{- define "distinfer.engineKwargs" -}}
{{- $e := .Values.engine -}}
{{- $kw := dict "dtype" $e.dtype "max_num_seqs" (int $e.maxNumSeqs) "max_num_batched_tokens" (int $e.maxNumBatchedTokens) "enable_prefix_caching" $e.enablePrefixCaching "gpu_memory_utilization" $e.gpuMemoryUtilization "kv_offloading_size" $e.kvOffloadingSize "kv_cache_bytes" (int64 $e.kvCacheBytes) -}}
{{- if $e.maxModelLen -}}
{{- $_ := set $kw "max_model_len" (int $e.maxModelLen) -}}
{{- end -}}
{{- toYaml $kw -}}
{{- end -}}

{{- define "distinfer.appArgs" -}}
{{- $e := .Values.engine -}}
{{- $r := .Values.router -}}
{{- $args := dict "model" nil "served_model_name" nil "tensor_parallel_size" (int $e.tensorParallelSize) "pipeline_parallel_size" (int $e.pipelineParallelSize) "device" $e.device "engine_kwargs" (include "distinfer.engineKwargs" . | fromYaml) "num_instances" (int $r.instances) "prefill_instances" (int $r.prefillInstances) "decode_instances" (int $r.decodeInstances) "migration_transport" $r.migrationTransport -}}
{{- with include "distinfer.modelPath" . }}{{ $_ := set $args "model" . }}{{ end -}}
{{- with .Values.model.servedModelName }}{{ $_ := set $args "served_model_name" . }}{{ end -}}
{{- with $r.dispatchPolicy }}{{ $_ := set $args "dispatch_policy" . }}{{ end -}}
{{- with $r.migrationPolicy }}{{ $_ := set $args "migration_policy" . }}{{ end -}}
{{- with .Values.serve.acceleratorType }}{{ $_ := set $args "accelerator_type" . }}{{ end -}}
{{- $_ := set $args "sequence_parallel_size" (int $e.sequenceParallelSize) -}}
{{- toYaml $args -}}
{{- end -}}

{{/* The replica settings of the DistInfer deployment(s): fixed or autoscaled. */}}
{{- define "distinfer.replicaSettings" -}}
{{- $s := .Values.serve -}}
{{- if $s.autoscaling.enabled -}}
{{- $a := $s.autoscaling -}}
{{- toYaml (dict "autoscaling_config" (dict "min_replicas" (int $a.minReplicas) "initial_replicas" (int $a.initialReplicas) "max_replicas" (int $a.maxReplicas) "target_ongoing_requests" (int $a.targetOngoingRequests) "upscale_delay_s" (int $a.upscaleDelayS) "downscale_delay_s" (int $a.downscaleDelayS))) -}}
{{- else -}}
{{- toYaml (dict "num_replicas" (int $s.numReplicas)) -}}
{{- end -}}
{{- end -}}

{{/* `models`: args {api_key, models: [ServeAppArgs + replica settings]} (distinfer/serving/ray_serve_multi.py);
     each entry starts from the single model's args and takes the entry's own settings. */}}
{{- define "distinfer.multiModelArgs" -}}
{{- $base := include "distinfer.appArgs" . | fromYaml -}}
{{- $entries := list -}}
{{- range .Values.models -}}
{{- $args := deepCopy $base -}}
{{- $kw := get $args "engine_kwargs" -}}
{{- with include "distinfer.modelPathOf" (dict "model" $.Values.model "path" .path) }}{{ $_ := set $args "model" . }}{{ end -}}
{{- $_ := set $args "served_model_name" .servedModelName -}}
{{- if .tensorParallelSize }}{{ $_ := set $args "tensor_parallel_size" (int .tensorParallelSize) }}{{ end -}}
{{- if .pipelineParallelSize }}{{ $_ := set $args "pipeline_parallel_size" (int .pipelineParallelSize) }}{{ end -}}
{{- if .sequenceParallelSize }}{{ $_ := set $args "sequence_parallel_size" (int .sequenceParallelSize) }}{{ end -}}
{{- if .dtype }}{{ $_ := set $kw "dtype" .dtype }}{{ end -}}
{{- if .maxModelLen }}{{ $_ := set $kw "max_model_len" (int .maxModelLen) }}{{ end -}}
{{- if hasKey . "gpuMemoryUtilization" }}{{ $_ := set $kw "gpu_memory_utilization" .gpuMemoryUtilization }}{{ end -}}
{{- if hasKey . "kvOffloadingSize" }}{{ $_ := set $kw "kv_offloading_size" .kvOffloadingSize }}{{ end -}}
{{- if .numReplicas -}}
{{- $_ := set $args "num_replicas" (int .numReplicas) -}}
{{- else -}}
{{- $args = merge $args (include "distinfer.replicaSettings" $ | fromYaml) -}}
{{- end -}}
{{- $_ := set $args "max_ongoing_requests" (int $.Values.serve.maxOngoingRequests) -}}
{{- $entries = append $entries $args -}}
{{- end -}}
{{- toYaml (dict "models" $entries) -}}
{{- end -}}

{{/* serveConfigV2: the application deploy/serve_config.yaml describes, with the chart's values. */}}
{{- define "distinfer.serveConfig" -}}
{{- $s := .Values.serve -}}
{{- /* No ray_actor_options here: they would replace the builder's (the GPU of a one-rank replica). */ -}}
{{- $health := dict "health_check_period_s" (int $s.healthCheckPeriodS) "graceful_shutdown_timeout_s" (int $s.gracefulShutdownTimeoutS) -}}
{{- $app := dict "name" $s.applicationName "route_prefix" "/" "import_path" "distinfer.serving.ray_serve:app_builder" -}}
{{- if .Values.models -}}
{{- /* Replica settings travel in each entry's args; the deployments (DistInfer-<served name>) get the health settings. */ -}}
{{- $deployments := list -}}
{{- range .Values.models -}}
{{- $name := printf "DistInfer-%s" (regexReplaceAll "[^A-Za-z0-9._-]" .servedModelName "-") -}}
{{- $deployments = append $deployments (merge (dict "name" $name) $health) -}}
{{- end -}}
{{- $_ := set $app "args" (include "distinfer.multiModelArgs" . | fromYaml) -}}
{{- $_ := set $app "deployments" $deployments -}}
{{- else -}}
{{- $deployment := merge (dict "name" "DistInfer" "max_ongoing_requests" (int $s.maxOngoingRequests)) $health (include "distinfer.replicaSettings" . | fromYaml) -}}
{{- $_ := set $app "args" (include "distinfer.appArgs" . | fromYaml) -}}
{{- $_ := set $app "deployments" (list $deployment) -}}
{{- end -}}
{{- $servicers := list "distinfer.v1.inference_pb2_grpc.add_InferenceServiceServicer_to_server" "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server" -}}
{{- $config := dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" (int $s.httpPort)) "grpc_options" (dict "port" (int $s.grpcPort) "grpc_servicer_functions" $servicers) "logging_config" (dict "encoding" "TEXT" "log_level" $s.logLevel) "applications" (list $app) -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Pod pieces shared by the Ray head, the Ray workers and the plain Deployment. */}}
{{- define "distinfer.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "distinfer.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: {{ .Values.securityContext.readOnlyRootFilesystem }}
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{- define "distinfer.env" -}}
- name: DISTINFER_API_KEY_FILE
  value: /etc/distinfer/api-key/{{ .Values.apiKey.secretKey }}
- name: DISTINFER_CACHE_DIR
  value: /var/cache/distinfer
- name: HOME
  value: /tmp
{{- with include "distinfer.modelPath" . }}
- name: DISTINFER_MODEL
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{- define "distinfer.volumeMounts" -}}
- name: api-key
  mountPath: /etc/distinfer/api-key
  readOnly: true
- name: cache
  mountPath: /var/cache/distinfer
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
{{- if ne .Values.model.source "image" }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- if and .Values.tls.secretName (eq .Values.mode "deployment") }}
- name: tls
  mountPath: /etc/distinfer/tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "distinfer.volumes" -}}
- name: api-key
  secret:
    secretName: {{ include "distinfer.apiKeySecret" . }}
    items:
      - key: {{ .Values.apiKey.secretKey }}
        path: {{ .Values.apiKey.secretKey }}
- name: cache
{{- if .Values.model.cache.claimName }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.cache.claimName }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.model.cache.sizeLimit }}
{{- end }}
- name: tmp
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shm.sizeLimit }}
{{- if eq .Values.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
- name: model
  hostPath:
    path: {{ .Values.model.hostPath.path }}
    type: ""
{{- end }}
{{- if and .Values.tls.secretName (eq .Values.mode "deployment") }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
{{- end }}
{{- end -}}

{{/* Converts (.gguf) or checks the model once, into the cache, before the server container starts. */}}
{{- define "distinfer.initContainers" -}}
{{- if .Values.model.prepare }}
initContainers:
{{- range $i, $path := include "distinfer.modelPaths" . | fromJsonArray }}
  - name: prepare-model{{ if $.Values.models }}-{{ $i }}{{ end }}
    image: "{{ $.Values.image.repository }}:{{ $.Values.image.tag }}"
    imagePullPolicy: {{ $.Values.image.pullPolicy }}
    command: ["python", "/opt/distinfer/deploy/entrypoint.py", "prepare-model"]
    env:
      {{- include "distinfer.env" $ | nindent 6 }}
      {{- if and $.Values.models $path }}
      - name: DISTINFER_MODEL
        value: {{ $path | quote }}
      {{- end }}
    volumeMounts:
      {{- include "distinfer.volumeMounts" $ | nindent 6 }}
    securityContext:
      {{- include "distinfer.containerSecurityContext" $ | nindent 6 }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "distinfer.scheduling" -}}
{{- $s := .root.Values.scheduling -}}
{{- $nodeSelector := merge (deepCopy (default dict .nodeSelector)) $s.nodeSelector -}}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with concat $s.tolerations (default list .tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $s.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $s.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $s.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* Native gRPC health (grpc.health.v1) of distinfer serve; kubelet's gRPC probe has no TLS, so with
TLS the port is only checked to accept connections. */}}
{{- define "distinfer.grpcProbe" -}}
{{- if .Values.tls.secretName -}}
tcpSocket:
  port: grpc
{{- else -}}
grpc:
  port: {{ .Values.serve.grpcPort }}
  service: distinfer.v1.InferenceService
{{- end -}}
{{- end -}}

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

{{/* The model argument: "" means distinfer's default model. */}}
{{- define "distinfer.modelPath" -}}
{{- $m := .Values.model -}}
{{- if eq $m.source "image" -}}
{{- $m.path -}}
{{- else if $m.path -}}
{{- printf "%s/%s" (trimSuffix "/" $m.mountPath) (trimPrefix "/" $m.path) -}}
{{- else -}}
{{- $m.mountPath -}}
{{- end -}}
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
{{- /* ServeAppArgs gains sequence_parallel_size with issue 12; 1 is today's only value. */ -}}
{{- if gt (int $e.sequenceParallelSize) 1 }}{{ $_ := set $args "sequence_parallel_size" (int $e.sequenceParallelSize) }}{{ end -}}
{{- toYaml $args -}}
{{- end -}}

{{/* serveConfigV2: the application deploy/serve_config.yaml describes, with the chart's values. */}}
{{- define "distinfer.serveConfig" -}}
{{- $s := .Values.serve -}}
{{- $deployment := dict "name" "DistInfer" "max_ongoing_requests" (int $s.maxOngoingRequests) "health_check_period_s" (int $s.healthCheckPeriodS) "graceful_shutdown_timeout_s" (int $s.gracefulShutdownTimeoutS) "ray_actor_options" (dict "num_cpus" 1) -}}
{{- if $s.autoscaling.enabled -}}
{{- $a := $s.autoscaling -}}
{{- $_ := set $deployment "autoscaling_config" (dict "min_replicas" (int $a.minReplicas) "initial_replicas" (int $a.initialReplicas) "max_replicas" (int $a.maxReplicas) "target_ongoing_requests" (int $a.targetOngoingRequests) "upscale_delay_s" (int $a.upscaleDelayS) "downscale_delay_s" (int $a.downscaleDelayS)) -}}
{{- else -}}
{{- $_ := set $deployment "num_replicas" (int $s.numReplicas) -}}
{{- end -}}
{{- $app := dict "name" $s.applicationName "route_prefix" "/" "import_path" "distinfer.serving.ray_serve:app_builder" "args" (include "distinfer.appArgs" . | fromYaml) "deployments" (list $deployment) -}}
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
  - name: prepare-model
    image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: ["python", "/opt/distinfer/deploy/entrypoint.py", "prepare-model"]
    env:
      {{- include "distinfer.env" . | nindent 6 }}
    volumeMounts:
      {{- include "distinfer.volumeMounts" . | nindent 6 }}
    securityContext:
      {{- include "distinfer.containerSecurityContext" . | nindent 6 }}
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

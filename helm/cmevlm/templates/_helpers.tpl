{{/* cmevlm.fullname: the release's name prefix for every object (63 characters at most). */}}
{{- define "cmevlm.fullname" -}}
{{- printf "%s-cmevlm" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{/* cmevlm.labels: the standard labels plus the site, on every object. */}}
{{- define "cmevlm.labels" -}}
app.kubernetes.io/name: cmevlm
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
cmevlm.io/site: {{ .Values.site | quote }}
{{- end -}}

{{/* cmevlm.containerSecurity: non-root, read-only root filesystem (Ray writes to the /tmp and
~/.cache emptyDirs), no privilege escalation, no capabilities. */}}
{{- define "cmevlm.containerSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .Values.runAsUser }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* cmevlm.secretEnv: the keys of existingSecret this pod uses, each by reference (a missing key
is left unset): the object store's everywhere, the teacher's only where `teacher` (teach,
prefer, evaluate, the pipeline, a site), the serving keys only where `serve`. The names are
secretKeys in values.yaml. Args: (dict "ctx" $ "teacher" BOOL "serve" BOOL). */}}
{{- define "cmevlm.secretEnv" -}}
{{- $k := .ctx.Values.secretKeys -}}
{{- $keys := $k.storage -}}
{{- if .teacher }}{{ $keys = concat $keys $k.teacher }}{{ end -}}
{{- if .serve }}{{ $keys = concat $keys $k.serve }}{{ end -}}
{{- range $keys }}
- name: {{ . }}
  valueFrom:
    secretKeyRef: {name: {{ $.ctx.Values.existingSecret | quote }}, key: {{ . }}, optional: true}
{{- end }}
{{- end -}}

{{/* cmevlm.authOptions: KubeRay's Ray token authentication of a Ray cluster (KubeRay 1.5.1+,
Ray 2.52+): every Ray container gets RAY_AUTH_MODE=token and the token of rayAuth.secretName
(key auth_token); the GCS, the raylets and the dashboard (the Job API) refuse anyone without it. */}}
{{- define "cmevlm.authOptions" -}}
authOptions:
  mode: token
  secretName: {{ .Values.rayAuth.secretName | quote }}
{{- end -}}

{{/* cmevlm.authEnv: what a client of a head (the RayJob's submitter) needs to authenticate. */}}
{{- define "cmevlm.authEnv" -}}
- {name: RAY_AUTH_MODE, value: token}
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ .Values.rayAuth.secretName | quote }}, key: auth_token}
{{- end -}}

{{/* cmevlm.container: a Ray container. Args: (dict "ctx" $ "name" NAME "resources" RES "teacher"
BOOL "serve" BOOL). Secrets come from the existing Secret by reference only, each key only
where it is used (cmevlm.secretEnv); the run config from the ConfigMap. */}}
{{- define "cmevlm.container" -}}
{{- $ := .ctx -}}
- name: {{ .name }}
  image: {{ printf "%s:%s" $.Values.image.repository $.Values.image.tag | quote }}
  imagePullPolicy: {{ $.Values.image.pullPolicy }}
  {{- with .ports }}
  ports:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  resources:
    {{- toYaml .resources | nindent 4 }}
  securityContext:
    {{- include "cmevlm.containerSecurity" $ | nindent 4 }}
  env:
    - name: RAY_USAGE_STATS_ENABLED
      value: "0"
    {{- include "cmevlm.secretEnv" (dict "ctx" $ "teacher" .teacher "serve" .serve) | nindent 4 }}
  volumeMounts:
    - name: run-config
      mountPath: /etc/cmevlm
      readOnly: true
    - name: tmp
      mountPath: /tmp
    - name: cache
      mountPath: /home/ray/.cache
{{- end -}}

{{/* cmevlm.podExtras: pod security, the run-config and /tmp volumes, and whether the pod gets a
service-account token: only heads do (their autoscaler calls the API). Args: (dict "ctx" $
"head" BOOL). */}}
{{- define "cmevlm.podExtras" -}}
{{- $ := .ctx -}}
{{- if .head -}}
serviceAccountName: {{ include "cmevlm.fullname" $ }}-autoscaler
automountServiceAccountToken: true
{{- else -}}
automountServiceAccountToken: false
{{- end }}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ $.Values.runAsUser }}
  fsGroup: {{ $.Values.runAsUser }}
volumes:
  - name: run-config
    configMap:
      name: {{ include "cmevlm.fullname" $ }}-config
  - name: tmp
    emptyDir: {}
  - name: cache
    emptyDir: {}
{{- end -}}

{{/* cmevlm.podLabels: labels of every pod of one Ray cluster. cmevlm.io/ray-cluster names the
cluster (the NetworkPolicies let its pods, and only them, reach each other); cmevlm.io/role
is head, worker or submitter. Args: (dict "ctx" $ "cluster" NAME "stage" STAGE "role" ROLE
"teacher" BOOL). */}}
{{- define "cmevlm.podLabels" -}}
{{ include "cmevlm.labels" .ctx }}
cmevlm.io/stage: {{ .stage }}
cmevlm.io/ray-cluster: {{ .cluster }}
cmevlm.io/role: {{ .role }}
{{- if .teacher }}
cmevlm.io/calls-teacher: "true"
{{- end }}
{{- end -}}

{{/* cmevlm.kueueFixed: "true" when Kueue queues the jobs as fixed-size gangs (kueue.queueName set,
kueue.mode fixed): Kueue's RayJob webhook refuses a queued job with in-tree autoscaling unless it
is elastic, so every worker group then starts at its maxReplicas and stays there. "" otherwise. */}}
{{- define "cmevlm.kueueFixed" -}}
{{- if and .Values.kueue.queueName (ne .Values.kueue.mode "elastic") }}true{{ end -}}
{{- end -}}

{{/* cmevlm.rayCluster: the Ray cluster of a RayJob: a head without GPUs running the in-tree
autoscaler, a CPU worker group and an H100 worker group, both from minReplicas (0 by default)
up to maxReplicas as Ray asks. Args: (dict "ctx" $ "cluster" NAME "stage" STAGE "teacher" BOOL). */}}
{{- define "cmevlm.rayCluster" -}}
{{- $ := .ctx -}}
{{- $cluster := .cluster -}}
{{- $stage := .stage -}}
{{- $teacher := .teacher -}}
{{- $fixed := include "cmevlm.kueueFixed" $ -}}
rayVersion: {{ $.Values.rayVersion | quote }}
{{ include "cmevlm.authOptions" $ }}
{{- if $fixed }}
enableInTreeAutoscaling: false  # Kueue admits a fixed-size cluster (kueue.mode: fixed)
{{- else }}
enableInTreeAutoscaling: true
autoscalerOptions:
  idleTimeoutSeconds: {{ $.Values.autoscaler.idleTimeoutSeconds }}
  resources:
    {{- toYaml $.Values.autoscaler.resources | nindent 4 }}
  securityContext:
    {{- include "cmevlm.containerSecurity" $ | nindent 4 }}
{{- end }}
headGroupSpec:
  rayStartParams:
    num-cpus: "0"  # no work on the head: it holds GCS, the dashboard and the driver
    num-gpus: "0"
    dashboard-host: 0.0.0.0
  template:
    metadata:
      labels:
        {{- include "cmevlm.podLabels" (dict "ctx" $ "cluster" .cluster "stage" .stage "role" "head" "teacher" .teacher) | nindent 8 }}
    spec:
      {{- include "cmevlm.podExtras" (dict "ctx" $ "head" true) | nindent 6 }}
      containers:
        {{- include "cmevlm.container" (dict "ctx" $ "name" "ray-head" "teacher" $teacher "resources" $.Values.head.resources "ports" (list (dict "containerPort" 6379 "name" "gcs") (dict "containerPort" 8265 "name" "dashboard") (dict "containerPort" 10001 "name" "client"))) | nindent 8 }}
workerGroupSpecs:
  {{- range $group := list "cpu" "h100" }}
  {{- $w := index $.Values.workers $group }}
  {{- if ne $w.enabled false }}
  {{- $min := ternary $w.maxReplicas $w.minReplicas (not (empty $fixed)) }}
  - groupName: {{ $group }}
    replicas: {{ $min }}
    minReplicas: {{ $min }}
    maxReplicas: {{ $w.maxReplicas }}
    rayStartParams: {}
    template:
      metadata:
        labels:
          {{- include "cmevlm.podLabels" (dict "ctx" $ "cluster" $cluster "stage" $stage "role" "worker" "teacher" $teacher) | nindent 10 }}
      spec:
        {{- include "cmevlm.podExtras" (dict "ctx" $ "head" false) | nindent 8 }}
        {{- $res := deepCopy $w.resources }}
        {{- if eq $group "h100" }}
        {{- $_ := set $res.requests "nvidia.com/gpu" (toString $w.gpus) }}
        {{- $_ := set $res.limits "nvidia.com/gpu" (toString $w.gpus) }}
        {{- with $w.nodeSelector }}
        nodeSelector:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with $w.tolerations }}
        tolerations:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with $w.affinity }}
        affinity:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- end }}
        containers:
          {{- include "cmevlm.container" (dict "ctx" $ "name" "ray-worker" "teacher" $teacher "resources" $res) | nindent 10 }}
  {{- end }}
  {{- end }}
{{- end -}}

{{/* cmevlm.rayJob: a RayJob running `python jobs/run.py TARGET` (pipeline or a stage) on its
own autoscaled Ray cluster, deleted when the job ends. Args: (dict "ctx" $ "target" TARGET
"teacher" BOOL). */}}
{{- define "cmevlm.rayJob" -}}
{{- $ := .ctx -}}
{{- $name := printf "%s-%s" (include "cmevlm.fullname" $) .target -}}
apiVersion: ray.io/v1
kind: RayJob
metadata:
  name: {{ $name }}
  labels:
    {{- include "cmevlm.labels" $ | nindent 4 }}
    app.kubernetes.io/component: {{ .target }}
    cmevlm.io/stage: {{ .target }}
    {{- with $.Values.kueue.queueName }}
    kueue.x-k8s.io/queue-name: {{ . | quote }}
    {{- end }}
  {{- if and $.Values.kueue.queueName (eq $.Values.kueue.mode "elastic") }}
  annotations:
    kueue.x-k8s.io/elastic-job: "true"  # Kueue's ElasticJobsViaWorkloadSlices: an autoscaled RayJob admitted in slices
  {{- end }}
spec:
  entrypoint: python jobs/run.py {{ .target }} --config /etc/cmevlm/run.yaml
  {{- if $.Values.kueue.queueName }}
  suspend: true
  {{- end }}
  {{- with $.Values.rayJob.deletionStrategy }}
  deletionStrategy:  # KubeRay 1.5+, feature gate RayJobDeletionPolicy; replaces shutdownAfterJobFinishes
    {{- toYaml . | nindent 4 }}
  {{- else }}
  shutdownAfterJobFinishes: {{ $.Values.rayJob.shutdownAfterJobFinishes }}
  ttlSecondsAfterFinished: {{ $.Values.rayJob.ttlSecondsAfterFinished }}
  {{- end }}
  activeDeadlineSeconds: {{ $.Values.rayJob.activeDeadlineSeconds }}
  backoffLimit: {{ $.Values.rayJob.backoffLimit }}
  submissionMode: K8sJobMode
  submitterPodTemplate:
    metadata:
      labels:
        {{- include "cmevlm.podLabels" (dict "ctx" $ "cluster" $name "stage" .target "role" "submitter" "teacher" false) | nindent 8 }}
    spec:
      restartPolicy: Never
      automountServiceAccountToken: false
      securityContext:
        runAsNonRoot: true
        runAsUser: {{ $.Values.runAsUser }}
      containers:
        - name: ray-job-submitter
          image: {{ printf "%s:%s" $.Values.image.repository $.Values.image.tag | quote }}
          imagePullPolicy: {{ $.Values.image.pullPolicy }}
          resources:
            requests: {cpu: 500m, memory: 512Mi}
            limits: {cpu: 500m, memory: 512Mi}
          securityContext:
            {{- include "cmevlm.containerSecurity" $ | nindent 12 }}
          env:  # `ray job submit` to the head's Job API, which token auth guards
            {{- include "cmevlm.authEnv" $ | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            - name: cache
              mountPath: /home/ray/.cache
      volumes:
        - name: tmp
          emptyDir: {}
        - name: cache
          emptyDir: {}
  rayClusterSpec:
    {{- include "cmevlm.rayCluster" (dict "ctx" $ "cluster" $name "stage" .target "teacher" .teacher) | nindent 4 }}
{{- end -}}

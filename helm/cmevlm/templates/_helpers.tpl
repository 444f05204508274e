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

{{/* cmevlm.container: a Ray container. Args: (dict "ctx" $ "name" NAME "resources" RES). Secrets
come from the existing Secret by reference only; the run config from the ConfigMap. */}}
{{- define "cmevlm.container" -}}
{{- $ := .ctx -}}
- name: {{ .name }}
  image: "{{ $.Values.image.repository }}:{{ $.Values.image.tag }}"
  imagePullPolicy: {{ $.Values.image.pullPolicy }}
  {{- with .ports }}
  ports:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  resources:
    {{- toYaml .resources | nindent 4 }}
  securityContext:
    {{- include "cmevlm.containerSecurity" $ | nindent 4 }}
  envFrom:
    - secretRef:
        name: {{ $.Values.existingSecret }}
        optional: true
  env:
    - name: RAY_USAGE_STATS_ENABLED
      value: "0"
  volumeMounts:
    - name: run-config
      mountPath: /etc/cmevlm
      readOnly: true
    - name: tmp
      mountPath: /tmp
    - name: cache
      mountPath: /home/ray/.cache
{{- end -}}

{{/* cmevlm.podExtras: pod security, the run-config and /tmp volumes. Args: the root context. */}}
{{- define "cmevlm.podExtras" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ .Values.runAsUser }}
  fsGroup: {{ .Values.runAsUser }}
volumes:
  - name: run-config
    configMap:
      name: {{ include "cmevlm.fullname" . }}-config
  - name: tmp
    emptyDir: {}
  - name: cache
    emptyDir: {}
{{- end -}}

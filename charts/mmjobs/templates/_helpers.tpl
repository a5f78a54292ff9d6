{{/*
Helpers shared by every template. All names are prefixed with the chart name ("mmjobs.") so
they cannot clash with a parent chart's helpers.
*/}}

{{/* Chart name, overridable with nameOverride; a DNS label (<= 63 characters). */}}
{{- define "mmjobs.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, truncated to 63 characters (the DNS label limit). When the release
name already contains the chart name it is used as is: `helm install mmjobs ...` gives
"mmjobs", so the Secrets are "mmjobs-s3" / "mmjobs-mlflow", the names recipes use by default.
*/}}
{{- define "mmjobs.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Name of one component's object: "<fullname>-<component>", <= 63 characters. The fullname is
shortened before the suffix is added, so two components never collapse to the same name.
Usage: include "mmjobs.componentName" (list . "mlflow")
*/}}
{{- define "mmjobs.componentName" -}}
{{- $ctx := index . 0 }}
{{- $component := index . 1 }}
{{- $prefix := include "mmjobs.fullname" $ctx | trunc (int (sub 62 (len $component))) | trimSuffix "-" }}
{{- printf "%s-%s" $prefix $component }}
{{- end }}

{{/* Chart label value: name-version, with "+" (not allowed in labels) replaced. */}}
{{- define "mmjobs.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Recommended app.kubernetes.io labels for every object. */}}
{{- define "mmjobs.labels" -}}
helm.sh/chart: {{ include "mmjobs.chart" . }}
{{ include "mmjobs.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mmjobs
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that identify this release's pods (immutable Deployment selectors use them). */}}
{{- define "mmjobs.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mmjobs.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of one component: usage include "mmjobs.componentLabels" (list . "mlflow") */}}
{{- define "mmjobs.componentLabels" -}}
{{ include "mmjobs.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Selector labels of one component: usage include "mmjobs.componentSelectorLabels" (list . "mlflow") */}}
{{- define "mmjobs.componentSelectorLabels" -}}
{{ include "mmjobs.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* The service account pipeline pods (and this chart's pods) run as. */}}
{{- define "mmjobs.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mmjobs.componentName" (list . "runner")) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* mmjobs image reference (upload job, bucket job, helm test; MLflow unless overridden). */}}
{{- define "mmjobs.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The MLflow server image: mlflow.image, falling back to the mmjobs image. */}}
{{- define "mmjobs.mlflowImage" -}}
{{- if .Values.mlflow.image.repository }}
{{- printf "%s:%s" .Values.mlflow.image.repository (required "mlflow.image.tag: required when mlflow.image.repository is set" .Values.mlflow.image.tag) }}
{{- else }}
{{- include "mmjobs.image" . }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- S3 settings */}}

{{/* The bucket for the store, MLflow artifacts and the pipeline root. */}}
{{- define "mmjobs.s3Bucket" -}}
{{- if .Values.s3.bucket }}{{ .Values.s3.bucket }}{{ else if .Values.minio.enabled }}mmjobs{{ end }}
{{- end }}

{{/* S3 endpoint URL (with scheme), or "" for AWS S3's default endpoint. */}}
{{- define "mmjobs.s3EndpointUrl" -}}
{{- if .Values.minio.enabled }}
{{- printf "http://%s.%s.svc.cluster.local:%d" (include "mmjobs.componentName" (list . "minio")) .Release.Namespace (int .Values.minio.service.port) }}
{{- else }}
{{- .Values.s3.endpoint }}
{{- end }}
{{- end }}

{{/* Name of the Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. */}}
{{- define "mmjobs.s3SecretName" -}}
{{- default (include "mmjobs.componentName" (list . "s3")) .Values.s3.existingSecret }}
{{- end }}

{{/* Name of the Secret with MLFLOW_TRACKING_USERNAME / _PASSWORD / MLFLOW_FLASK_SERVER_SECRET_KEY. */}}
{{- define "mmjobs.mlflowSecretName" -}}
{{- default (include "mmjobs.componentName" (list . "mlflow")) .Values.mlflow.auth.existingSecret }}
{{- end }}

{{/* In-cluster URL of the MLflow tracking server. */}}
{{- define "mmjobs.mlflowUrl" -}}
{{- printf "http://%s.%s.svc.cluster.local:%d" (include "mmjobs.componentName" (list . "mlflow")) .Release.Namespace (int .Values.mlflow.service.port) }}
{{- end }}

{{/* Root of the mmjobs store (MMJOBS_STORE). */}}
{{- define "mmjobs.storeUri" -}}
{{- printf "s3://%s/%s" (include "mmjobs.s3Bucket" .) .Values.s3.storePrefix }}
{{- end }}

{{/* Env vars with the S3 credentials, read from the Secret (never inlined). */}}
{{- define "mmjobs.s3CredentialEnv" -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "mmjobs.s3SecretName" . }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "mmjobs.s3SecretName" . }}
      key: AWS_SECRET_ACCESS_KEY
{{- end }}

{{/* Plain S3 settings env: region and, unless AWS, the endpoint (for boto3 and MLflow). */}}
{{- define "mmjobs.s3Env" -}}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
{{- with include "mmjobs.s3EndpointUrl" . }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- pod defaults */}}

{{/*
Pod-level settings shared by every pod: security context, image pull secrets, scheduling.
usage: include "mmjobs.podDefaults" (list . .Values.mlflow) — the component's nodeSelector,
tolerations and affinity, when set, replace the chart-wide ones ((list . dict) for none).
*/}}
{{- define "mmjobs.podDefaults" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
serviceAccountName: {{ include "mmjobs.serviceAccountName" $root }}
# None of the chart's own pods calls the Kubernetes API.
automountServiceAccountToken: false
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- include "mmjobs.scheduling" (list $root $component) | trim | nindent 0 }}
{{- end }}

{{/* nodeSelector / tolerations / affinity of a component's pods, falling back to the chart-wide ones. */}}
{{- define "mmjobs.scheduling" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- with (default $root.Values.nodeSelector $component.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $root.Values.tolerations $component.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $root.Values.affinity $component.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Container security context shared by every container. */}}
{{- define "mmjobs.containerSecurityContext" -}}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
{{- end }}

{{/* ---------------------------------------------------------------- validation */}}

{{/*
Settings the schema cannot check (they depend on each other). Every problem is collected and
reported in one failure, naming the key and the fix.
*/}}
{{- define "mmjobs.validate" -}}
{{- $errors := list }}
{{- $s3 := .Values.s3 }}
{{- if and (not .Values.minio.enabled) (not $s3.bucket) }}
{{- $errors = append $errors "s3.bucket: required when minio.enabled is false (the bucket for the mmjobs store, MLflow artifacts and the KFP pipeline root)" }}
{{- end }}
{{- if and .Values.minio.enabled $s3.endpoint }}
{{- $errors = append $errors (printf "s3.endpoint: %q must be empty when minio.enabled is true (everything then uses the chart's MinIO service); set minio.enabled=false to use an external S3" $s3.endpoint) }}
{{- end }}
{{- if and (not $s3.existingSecret) (ne (empty $s3.accessKeyId) (empty $s3.secretAccessKey)) }}
{{- $errors = append $errors "s3.accessKeyId / s3.secretAccessKey: set both or neither" }}
{{- end }}
{{- if and (not .Values.minio.enabled) (not $s3.existingSecret) (or (not $s3.accessKeyId) (not $s3.secretAccessKey)) }}
{{- $errors = append $errors "s3.existingSecret: required with an external S3 (minio.enabled=false), naming a Secret with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or set s3.accessKeyId and s3.secretAccessKey to have the chart create it)" }}
{{- end }}
{{- $backend := .Values.mlflow.backend }}
{{- if and (eq $backend.type "postgresql") (not $backend.existingSecret) }}
{{- $errors = append $errors (printf "mlflow.backend.existingSecret: required when mlflow.backend.type is postgresql, naming a Secret whose key %q holds the DSN (postgresql://user:password@host:5432/db)" $backend.existingSecretKey) }}
{{- end }}
{{- if and (eq $backend.type "sqlite") (gt (int .Values.mlflow.replicaCount) 1) }}
{{- $errors = append $errors (printf "mlflow.replicaCount: %d replicas cannot share one SQLite file; use 1 or mlflow.backend.type=postgresql" (int .Values.mlflow.replicaCount)) }}
{{- end }}
{{- $auth := .Values.mlflow.auth }}
{{- if and $auth.enabled (not $auth.existingSecret) (not $auth.username) }}
{{- $errors = append $errors "mlflow.auth.username: required when mlflow.auth.enabled is true and no mlflow.auth.existingSecret is given" }}
{{- end }}
{{- if and .Values.pipelineUpload.enabled (not .Values.pipelineUpload.recipes) }}
{{- $errors = append $errors "pipelineUpload.recipes: list at least one recipe path (inside the image), or set pipelineUpload.enabled=false" }}
{{- end }}
{{- if $errors }}
{{- fail (printf "\n\ninvalid values for the mmjobs chart:\n  - %s\n" (join "\n  - " $errors)) }}
{{- end }}
{{- end }}

{{/* Host header patterns MLflow accepts (MLFLOW_SERVER_ALLOWED_HOSTS, comma-separated). */}}
{{- define "mmjobs.mlflowAllowedHosts" -}}
{{- $svc := include "mmjobs.componentName" (list . "mlflow") }}
{{- $hosts := list "localhost" "localhost:*" "127.0.0.1" "127.0.0.1:*" }}
{{- range $suffix := list "" (printf ".%s" .Release.Namespace) (printf ".%s.svc" .Release.Namespace) (printf ".%s.svc.cluster.local" .Release.Namespace) }}
{{- $hosts = append $hosts (printf "%s%s" $svc $suffix) }}
{{- $hosts = append $hosts (printf "%s%s:*" $svc $suffix) }}
{{- end }}
{{- /* Names users reach it by from outside: its Ingress hosts and HTTPRoute hostnames. */}}
{{- if .Values.mlflow.ingress.enabled }}
{{- $hosts = concat $hosts .Values.mlflow.ingress.hosts }}
{{- end }}
{{- if .Values.mlflow.httpRoute.enabled }}
{{- $hosts = concat $hosts .Values.mlflow.httpRoute.hostnames }}
{{- end }}
{{- join "," (concat $hosts .Values.mlflow.allowedHosts | uniq) }}
{{- end }}

{{/*
The chart name (nameOverride wins).
*/}}
{{- define "whaleflux.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the chart's objects: fullnameOverride, else "<release>-<name>", or the release
name alone when it already contains the chart name. Also the Lease name.
*/}}
{{- define "whaleflux.fullname" -}}
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
"name-version" for the helm.sh/chart label.
*/}}
{{- define "whaleflux.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object of the chart.
*/}}
{{- define "whaleflux.labels" -}}
helm.sh/chart: {{ include "whaleflux.chart" . }}
{{ include "whaleflux.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: whaleflux
{{- end }}

{{/*
Selector labels of the operator pods (never app.kubernetes.io/component=worker, so the worker
PodMonitor and the operator's selectors never overlap).
*/}}
{{- define "whaleflux.selectorLabels" -}}
app.kubernetes.io/name: {{ include "whaleflux.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
The operator's ServiceAccount name.
*/}}
{{- define "whaleflux.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "whaleflux.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {repository, tag, digest}: repository@digest when a digest is set,
else repository:tag, the tag defaulting to the chart's appVersion.
Call with (dict "image" .Values.image "root" .).
*/}}
{{- define "whaleflux.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/*
The operator's cluster configuration file (ConfigMap key operator.yaml). Its checksum rolls the
operator pods on change.
*/}}
{{- define "whaleflux.operatorConfig" -}}
# WhaleFlux operator configuration, rendered by the Helm chart (values workerImage,
# downloadImage, imagePullSecrets, gpuTolerations, allowedHostPaths, allowedImages,
# workerMetricsFrom). Change it with `helm upgrade`, which restarts
# the operator.
workerImage: {{ include "whaleflux.imageRef" (dict "image" .Values.workerImage "root" .) | quote }}
downloadImage: {{ include "whaleflux.imageRef" (dict "image" .Values.downloadImage "root" .) | quote }}
{{- $names := list }}
{{- range .Values.imagePullSecrets }}
{{- $names = append $names .name }}
{{- end }}
imagePullSecrets: {{ $names | toJson }}
gpuTolerations: {{ .Values.gpuTolerations | default list | toJson }}
allowedHostPaths: {{ .Values.allowedHostPaths | default list | toJson }}
allowedImages: {{ .Values.allowedImages | default list | toJson }}
workerMetricsFrom: {{ .Values.workerMetricsFrom | default list | toJson }}
{{- end }}

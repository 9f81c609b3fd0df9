{{/* Chart name. */}}
{{- define "mr2nst.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. */}}
{{- define "mr2nst.fullname" -}}
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

{{- define "mr2nst.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mr2nst.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mr2nst.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mr2nst.labels" -}}
helm.sh/chart: {{ include "mr2nst.chart" . }}
{{ include "mr2nst.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The DICOM port inside the container (node.port is forced to it). */}}
{{- define "mr2nst.containerPort" -}}
11112
{{- end }}

{{/* Our AE title, for the probes' called AE. */}}
{{- define "mr2nst.aeTitle" -}}
{{- dig "node" "ae_title" "MR2NST" (.Values.config | default dict) }}
{{- end }}

{{/* The config as a dict: values.config plus what the chart fixes. */}}
{{- define "mr2nst.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- $node := get $cfg "node" | default dict }}
{{- $_ := set $node "data_dir" "/var/lib/mr2nst" }}
{{- $_ := set $node "port" 11112 }}
{{- $callers := get $node "allowed_callers" | default list }}
{{- if and .Values.probes.enabled $callers }}
{{- $_ := set $node "allowed_callers" (append $callers (printf "%s@127.0.0.1" .Values.probes.callingAE)) }}
{{- end }}
{{- $_ := set $cfg "node" $node }}
{{- $metrics := get $cfg "metrics" | default dict }}
{{- $_ := set $metrics "host" "0.0.0.0" }}
{{- $_ := set $metrics "port" (ternary (int .Values.metrics.port) 0 .Values.metrics.enabled) }}
{{- $_ := set $cfg "metrics" $metrics }}
{{- toToml $cfg }}
{{- end }}

{{/* resources, without a zero nvidia.com/gpu limit. */}}
{{- define "mr2nst.resources" -}}
{{- $res := deepCopy (.Values.resources | default dict) }}
{{- $limits := get $res "limits" | default dict }}
{{- if not (get $limits "nvidia.com/gpu") }}
{{- $_ := unset $limits "nvidia.com/gpu" }}
{{- end }}
{{- if $limits }}
{{- $_ := set $res "limits" $limits }}
{{- else }}
{{- $_ := unset $res "limits" }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{- define "mr2nst.claimName" -}}
{{- .Values.persistence.existingClaim | default (printf "%s-data" (include "mr2nst.fullname" .)) }}
{{- end }}

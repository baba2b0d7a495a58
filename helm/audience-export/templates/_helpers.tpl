{{/* Names, labels and the pieces every role's pod shares. */}}

{{- define "ae.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ae.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The name of one role's objects: <fullname>-<role>. Takes (list $ "worker"). */}}
{{- define "ae.roleName" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" (include "ae.fullname" $root | trunc 52 | trimSuffix "-") (index . 1) -}}
{{- end -}}

{{- define "ae.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "ae.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: audience-export
{{- end -}}

{{- define "ae.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ae.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of one role. Takes (list $ "worker"). */}}
{{- define "ae.roleSelectorLabels" -}}
{{ include "ae.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "ae.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ae.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret the pods read: the chart's dev Secret, or the operator's. */}}
{{- define "ae.secretName" -}}
{{- if .Values.secrets.create -}}
{{- printf "%s-dev" (include "ae.fullname" .) -}}
{{- else -}}
{{- required "secrets.existingSecret: name the Secret holding api-key, encryption-keys, app-secret, amqp-url and redis-url (or, for a dev install only, set secrets.create)" .Values.secrets.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "ae.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The shard queue KEDA watches: {AE_NAMESPACE}.shards (the binaries' default namespace is ae). */}}
{{- define "ae.shardQueue" -}}
{{- printf "%s.shards" (default "ae" .Values.config.namespace) -}}
{{- end -}}

{{/*
One setting's value as an environment string. Helm reads YAML numbers as float64: print whole
numbers without an exponent (1209600, not 1.2096e+06); lists (retry_delays_ms) as JSON.
*/}}
{{- define "ae.envValue" -}}
{{- $v := . -}}
{{- if kindIs "float64" $v -}}
{{- if eq $v (floor $v) }}{{ printf "%d" (int64 $v) }}{{ else }}{{ $v }}{{ end -}}
{{- else if kindIs "slice" $v -}}
{{- toJson $v -}}
{{- else -}}
{{- $v | toString -}}
{{- end -}}
{{- end -}}

{{/* `config` as AE_ variables: top-level keys as AE_<KEY>, sections as AE_<SECTION>__<KEY>. */}}
{{- define "ae.configEnv" -}}
{{- range $key, $value := .Values.config }}
{{- if kindIs "map" $value }}
{{- range $sub, $v := $value }}
{{- if and (not (kindIs "invalid" $v)) (ne (toString $v) "") }}
- name: {{ printf "AE_%s__%s" (upper $key) (upper $sub) }}
  value: {{ include "ae.envValue" $v | quote }}
{{- end }}
{{- end }}
{{- else if and (not (kindIs "invalid" $value)) (ne (toString $value) "") }}
- name: {{ printf "AE_%s" (upper $key) }}
  value: {{ include "ae.envValue" $value | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* One secret as an environment variable. Takes (dict "root" $ "env" NAME "key" KEY "optional" BOOL). */}}
{{- define "ae.secretEnv" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ include "ae.secretName" .root }}
      key: {{ .key }}
      {{- if .optional }}
      optional: true
      {{- end }}
{{- end -}}

{{/* A NetworkPolicy peer from {namespaceSelector, podSelector} matchLabels maps, as a list. */}}
{{- define "ae.peer" -}}
{{- $peer := dict "podSelector" (dict) -}}
{{- with .podSelector }}{{ $_ := set $peer "podSelector" (dict "matchLabels" .) }}{{ end -}}
{{- with .namespaceSelector }}{{ $_ := set $peer "namespaceSelector" (dict "matchLabels" .) }}{{ end -}}
{{- list $peer | toYaml -}}
{{- end -}}

{{/* The chart's name. */}}
{{- define "flowgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* A fully qualified app name, at most 63 characters (DNS names). */}}
{{- define "flowgate.fullname" -}}
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

{{- define "flowgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "flowgate.labels" -}}
helm.sh/chart: {{ include "flowgate.chart" . }}
{{ include "flowgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "flowgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flowgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "flowgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "flowgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Whether the chart's own Secret exists: a PostgreSQL URL, admin tokens or a usage page secret to keep. */}}
{{- define "flowgate.ownSecret" -}}
{{- if and (not .Values.existingSecret) (or (and (eq .Values.store.kind "postgres") .Values.store.url) .Values.admin.tokens .Values.usagePage.sessionSecret) }}true{{- end }}
{{- end }}

{{/* The Secret holding FLOWGATE_STORE_URL / FLOWGATE_ADMIN_TOKENS / FLOWGATE_USAGE_PAGE_SECRET, if any. */}}
{{- define "flowgate.secretName" -}}
{{- if .Values.existingSecret }}
{{- .Values.existingSecret }}
{{- else if include "flowgate.ownSecret" . }}
{{- include "flowgate.fullname" . }}
{{- end }}
{{- end }}

{{/* The claim holding the SQLite ledger. */}}
{{- define "flowgate.claimName" -}}
{{- default (printf "%s-ledger" (include "flowgate.fullname" .)) .Values.store.sqlite.persistence.existingClaim }}
{{- end }}

{{/*
Refuses values that would lose or split the ledger. Included by every template that depends on
the store, so that `helm template` and `helm install` fail with the reason.
*/}}
{{- define "flowgate.validate" -}}
{{- $kind := .Values.store.kind }}
{{- if not (has $kind (list "sqlite" "postgres")) }}
{{- fail (printf "store.kind must be \"sqlite\" or \"postgres\", not %q: flowgate needs a ledger" (toString $kind)) }}
{{- end }}
{{- if eq $kind "sqlite" }}
{{- if gt (int .Values.replicaCount) 1 }}
{{- fail "replicaCount > 1 with store.kind=sqlite: a SQLite ledger is one process's file, and every further pod would keep a ledger of its own. Use store.kind=postgres to run several replicas." }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- fail "autoscaling.enabled with store.kind=sqlite: an autoscaler would start pods with ledgers of their own. Use store.kind=postgres to scale." }}
{{- end }}
{{- if and (not .Values.store.sqlite.persistence.enabled) (not .Values.store.sqlite.persistence.acceptLedgerLoss) }}
{{- fail "store.sqlite.persistence.enabled=false keeps the ledger in an emptyDir that is lost with the pod (every usage event, charge and balance update). Keep persistence on, or set store.sqlite.persistence.acceptLedgerLoss=true for a demo." }}
{{- end }}
{{- else }}
{{- if and (not .Values.store.url) (not .Values.existingSecret) }}
{{- fail "store.kind=postgres needs its URL: set store.url, or existingSecret naming a Secret with FLOWGATE_STORE_URL." }}
{{- end }}
{{- end }}
{{- if and .Values.backup.enabled (ne $kind "sqlite") }}
{{- fail "backup.enabled is for SQLite ledgers; back PostgreSQL up with its own tools (pg_dump, continuous archiving)." }}
{{- end }}
{{- if and .Values.backup.enabled (not .Values.backup.claim) }}
{{- fail "backup.enabled needs backup.claim: an existing PersistentVolumeClaim to write the copies to." }}
{{- end }}
{{- end }}

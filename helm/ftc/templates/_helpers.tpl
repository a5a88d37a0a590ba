{{- define "ftc.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ftc.clusterName" -}}
{{- printf "%s-%s" (include "ftc.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ftc.labels" -}}
app.kubernetes.io/name: ftc
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ftc.selectorLabels" -}}
app.kubernetes.io/name: ftc
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "ftc.serviceAccountName" -}}
{{- default (include "ftc.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- /* The namespaces the operator watches, as a JSON list: watchNamespaces, else the release's namespace; []
     with watchAnyNamespace (every namespace). */}}
{{- define "ftc.watchNamespaces" -}}
{{- if .Values.watchAnyNamespace -}}
{{- if .Values.watchNamespaces -}}
{{- fail "set either watchNamespaces (a Role in each) or watchAnyNamespace (a ClusterRole), not both" -}}
{{- end -}}
[]
{{- else -}}
{{- toJson (uniq (.Values.watchNamespaces | default (list .Release.Namespace))) -}}
{{- end -}}
{{- end -}}

{{- /* Where the step ServiceAccount is created, as a JSON list: the release's namespace, the watched ones and
     stepServiceAccount.namespaces. */}}
{{- define "ftc.stepNamespaces" -}}
{{- toJson (uniq (concat (list .Release.Namespace) (include "ftc.watchNamespaces" . | fromJsonArray) .Values.stepServiceAccount.namespaces)) -}}
{{- end -}}

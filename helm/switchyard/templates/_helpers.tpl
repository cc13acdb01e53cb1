{{/* Names and labels. */}}
{{- define "switchyard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "switchyard.fullname" -}}
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

{{- define "switchyard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "switchyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component ("gateway" or "feed"): pass (list $ "gateway"). */}}
{{- define "switchyard.selector" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "switchyard.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "switchyard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "switchyard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "switchyard.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/* The backbone: the NATS URL the gateway uses, empty for the memory engine. */}}
{{- define "switchyard.natsUrl" -}}
{{- if .Values.nats.enabled }}
{{- $name := "nats" }}
{{- $full := ternary .Release.Name (printf "%s-%s" .Release.Name $name) (contains $name .Release.Name) | trunc 63 | trimSuffix "-" }}
{{- if .Values.nats.fullnameOverride }}{{ $full = .Values.nats.fullnameOverride | trunc 63 | trimSuffix "-" }}{{ end }}
{{- printf "nats://%s.%s.svc:4222" $full .Release.Namespace }}
{{- else }}
{{- .Values.externalNats.url }}
{{- end }}
{{- end }}

{{- define "switchyard.redisUrl" -}}
{{- if .Values.valkey.enabled }}
{{- $name := "valkey" }}
{{- $full := ternary .Release.Name (printf "%s-%s" .Release.Name $name) (contains $name .Release.Name) | trunc 63 | trimSuffix "-" }}
{{- if .Values.valkey.fullnameOverride }}{{ $full = .Values.valkey.fullnameOverride | trunc 63 | trimSuffix "-" }}{{ end }}
{{- printf "redis://%s.%s.svc:6379" $full .Release.Namespace }}
{{- else }}
{{- .Values.externalRedis.url }}
{{- end }}
{{- end }}

{{/* Replicas of each namespace's stream: the bundled cluster's size, or the external setting. */}}
{{- define "switchyard.streamReplicas" -}}
{{- if .Values.nats.enabled }}
{{- if .Values.nats.config.cluster.enabled }}{{ int .Values.nats.config.cluster.replicas }}{{ else }}1{{ end }}
{{- else }}
{{- int .Values.externalNats.streamReplicas }}
{{- end }}
{{- end }}

{{/* Seconds in a duration of the form the schema allows ("10s", "1500ms", "2m", "1h"), rounded up. */}}
{{- define "switchyard.seconds" -}}
{{- $d := toString . }}
{{- if hasSuffix "ms" $d }}{{ div (add (trimSuffix "ms" $d | int) 999) 1000 }}
{{- else if hasSuffix "s" $d }}{{ trimSuffix "s" $d | int }}
{{- else if hasSuffix "m" $d }}{{ mul (trimSuffix "m" $d | int) 60 }}
{{- else if hasSuffix "h" $d }}{{ mul (trimSuffix "h" $d | int) 3600 }}
{{- else }}{{ fail (printf "config.server.drain_timeout %q: use a whole number of ms, s, m or h" $d) }}
{{- end }}
{{- end }}

{{/*
TOML rendering. Helm's toToml writes every number as a float ("1024.0"), which the
gateway refuses for integer options, so values are rendered here: whole numbers as
integers, strings as basic strings (JSON escapes are valid TOML), lists inline.
*/}}
{{- define "switchyard.tomlValue" -}}
{{- if kindIs "string" . }}{{ toJson . }}
{{- else if kindIs "bool" . }}{{ . }}
{{- else if or (kindIs "float64" .) (kindIs "int64" .) (kindIs "int" .) }}
{{- if eq (float64 .) (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if kindIs "slice" . }}[{{ range $i, $v := . }}{{ if $i }}, {{ end }}{{ include "switchyard.tomlValue" $v }}{{ end }}]
{{- else }}{{ fail (printf "config: cannot render %v (%s) as TOML" . (kindOf .)) }}
{{- end }}
{{- end }}

{{- define "switchyard.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/* One table: (dict "path" "server" "table" $map); scalars first, then sub-tables. */}}
{{- define "switchyard.tomlTable" -}}
{{- $path := .path }}
{{- $table := .table }}
{{- $scalars := false }}
{{- range $v := values $table }}{{ if not (kindIs "map" $v) }}{{ $scalars = true }}{{ end }}{{ end }}
{{- if and $path (or $scalars (not $table)) }}
[{{ $path }}]
{{- end }}
{{- range $k := keys $table | sortAlpha }}
{{- $v := index $table $k }}
{{- if and (not (kindIs "map" $v)) (not (kindIs "invalid" $v)) }}
{{ include "switchyard.tomlKey" $k }} = {{ include "switchyard.tomlValue" $v }}
{{- end }}
{{- end }}
{{- range $k := keys $table | sortAlpha }}
{{- $v := index $table $k }}
{{- if kindIs "map" $v }}
{{- include "switchyard.tomlTable" (dict "path" (ternary (printf "%s.%s" $path (include "switchyard.tomlKey" $k)) (include "switchyard.tomlKey" $k) (ne $path "")) "table" $v) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Whether the gateway has a backbone (NATS), i.e. runs as a cluster. */}}
{{- define "switchyard.clustered" -}}
{{- if or .Values.nats.enabled .Values.externalNats.url }}true{{ end }}
{{- end }}

{{/* Key files mounted from the auth Secret: name → config path. */}}
{{- define "switchyard.keyFiles" -}}
{{- $files := dict }}
{{- $a := .Values.auth }}
{{- if $a.existingSecret }}
{{- if $a.existingSecretKeys.rsaPublicKey }}{{ $_ := set $files "rsa_public_key" $a.existingSecretKeys.rsaPublicKey }}{{ end }}
{{- if $a.existingSecretKeys.ecPublicKey }}{{ $_ := set $files "ec_public_key" $a.existingSecretKeys.ecPublicKey }}{{ end }}
{{- if $a.existingSecretKeys.jwks }}{{ $_ := set $files "jwks_file" $a.existingSecretKeys.jwks }}{{ end }}
{{- else }}
{{- if $a.rsaPublicKey }}{{ $_ := set $files "rsa_public_key" "rsa-public-key" }}{{ end }}
{{- if $a.ecPublicKey }}{{ $_ := set $files "ec_public_key" "ec-public-key" }}{{ end }}
{{- if $a.jwks }}{{ $_ := set $files "jwks_file" "jwks" }}{{ end }}
{{- end }}
{{- toJson $files }}
{{- end }}

{{/* The auth Secret's name and whether it carries an HMAC secret. */}}
{{- define "switchyard.authSecret" -}}
{{- default (printf "%s-auth" (include "switchyard.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "switchyard.hasHmac" -}}
{{- $a := .Values.auth }}
{{- if $a.existingSecret }}{{ if $a.existingSecretKeys.hmacSecret }}true{{ end }}
{{- else if or $a.hmacSecret (not (or $a.rsaPublicKey $a.ecPublicKey $a.jwks)) }}true
{{- end }}
{{- end }}

{{- define "switchyard.apiSecret" -}}
{{- default (printf "%s-auth" (include "switchyard.fullname" .)) .Values.api.existingSecret }}
{{- end }}

{{- define "switchyard.apiSecretKey" -}}
{{- if .Values.api.existingSecret }}{{ .Values.api.existingSecretKey }}{{ else }}api-key{{ end }}
{{- end }}

{{/*
Where each backbone credential comes from: {"TOKEN": {"secret": ..., "key": ...}, ...}
for NATS (TOKEN, USER, PASSWORD, CREDENTIALS) and Redis (PASSWORD): an existing
Secret's key, or the chart's own Secret when the value is given inline.
*/}}
{{- define "switchyard.natsCredentials" -}}
{{- $out := dict }}
{{- $n := .Values.externalNats }}
{{- if not .Values.nats.enabled }}
{{- $own := printf "%s-auth" (include "switchyard.fullname" .) }}
{{- range $var, $field := dict "TOKEN" "token" "USER" "user" "PASSWORD" "password" "CREDENTIALS" "credentials" }}
{{- if $n.existingSecret }}
{{- with index $n.existingSecretKeys $field }}{{ $_ := set $out $var (dict "secret" $n.existingSecret "key" .) }}{{ end }}
{{- else if index $n $field }}
{{- $_ := set $out $var (dict "secret" $own "key" (printf "nats-%s" $field)) }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{- define "switchyard.redisPassword" -}}
{{- $r := .Values.externalRedis }}
{{- if not .Values.valkey.enabled }}
{{- if and $r.existingSecret $r.existingSecretPasswordKey }}
{{- toJson (dict "secret" $r.existingSecret "key" $r.existingSecretPasswordKey) }}
{{- else if $r.password }}
{{- toJson (dict "secret" (printf "%s-auth" (include "switchyard.fullname" .)) "key" "redis-password") }}
{{- end }}
{{- end }}
{{- end }}

{{/* switchyard.toml for the gateway and the feed. */}}
{{- define "switchyard.config" -}}
{{- $cfg := deepCopy .Values.config }}
{{- $clustered := include "switchyard.clustered" . }}
{{- if and (not $clustered) (gt (int .Values.replicaCount) 1) }}
{{- fail "replicaCount > 1 needs a backbone: set nats.enabled or externalNats.url (nodes on the memory engine do not see each other)" }}
{{- end }}
{{- if and (not $clustered) .Values.autoscaling.enabled }}
{{- fail "autoscaling needs a backbone: set nats.enabled or externalNats.url, or autoscaling.enabled=false" }}
{{- end }}
{{- if and .Values.nats.enabled .Values.externalNats.url }}
{{- fail "set either nats.enabled (the bundled NATS) or externalNats.url, not both" }}
{{- end }}
{{- if and .Values.valkey.enabled .Values.externalRedis.url }}
{{- fail "set either valkey.enabled (the bundled Valkey) or externalRedis.url, not both" }}
{{- end }}
{{- $server := default (dict) $cfg.server }}
{{- $_ := set $server "listen" "0.0.0.0:8000" }}
{{- $_ := set $cfg "server" $server }}
{{- $auth := default (dict) $cfg.auth }}
{{- /* Only the Secret's key counts: never the binary's development default. */}}
{{- $_ := set $auth "hmac_secret" "" }}
{{- range $key, $file := include "switchyard.keyFiles" . | fromJson }}
{{- $_ := set $auth $key (printf "/etc/switchyard/keys/%s" $file) }}
{{- end }}
{{- $_ := set $cfg "auth" $auth }}
{{- $_ := set $cfg "engine" (dict "kind" (ternary "nats" "memory" (eq $clustered "true"))) }}
{{- if $clustered }}
{{- $nats := default (dict) $cfg.nats }}
{{- $_ := set $nats "url" (include "switchyard.natsUrl" .) }}
{{- if hasKey (include "switchyard.natsCredentials" . | fromJson) "CREDENTIALS" }}
{{- $_ := set $nats "credentials_file" "/etc/switchyard/nats/credentials" }}
{{- end }}
{{- $_ := set $cfg "nats" $nats }}
{{- end }}
{{- $redisUrl := include "switchyard.redisUrl" . }}
{{- if $redisUrl }}
{{- $redis := default (dict) $cfg.redis }}
{{- $_ := set $redis "url" $redisUrl }}
{{- $_ := set $cfg "redis" $redis }}
{{- end }}
{{- if gt (int .Values.metrics.port) 0 }}
{{- $_ := set $cfg "metrics" (dict "listen" (printf "0.0.0.0:%d" (int .Values.metrics.port))) }}
{{- end }}
{{- $feed := deepCopy .Values.feed.config }}
{{- $_ := set $feed "embedded" (and (not $clustered) .Values.feed.enabled) }}
{{- $_ := set $feed "listen" "0.0.0.0:8100" }}
{{- $_ := set $cfg "feed" $feed }}
{{- $replicas := include "switchyard.streamReplicas" . | int }}
{{- range $name, $ns := $cfg.namespaces }}
{{- if not (hasKey $ns "stream_replicas") }}
{{- $_ := set $ns "stream_replicas" $replicas }}
{{- end }}
{{- end }}
# Rendered by the switchyard chart from its values; keys as in config/switchyard.toml.
{{- include "switchyard.tomlTable" (dict "path" "" "table" $cfg) }}
{{- end }}

{{/* The port /metrics is scraped on: its own, or the gateway's http port. */}}
{{- define "switchyard.metricsPort" -}}
{{- ternary "metrics" "http" (gt (int .Values.metrics.port) 0) }}
{{- end }}

{{/* Environment shared by the gateway and the feed: node identity and secrets. */}}
{{- define "switchyard.env" -}}
- name: SWITCHYARD_CONFIG
  value: /etc/switchyard/switchyard.toml
- name: SWITCHYARD_SERVER__NODE_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: SWITCHYARD_SERVER__ADVERTISE
  value: "$(POD_IP):8000"
{{- if include "switchyard.hasHmac" . }}
- name: SWITCHYARD_AUTH__HMAC_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "switchyard.authSecret" . }}
      key: {{ ternary .Values.auth.existingSecretKeys.hmacSecret "hmac-secret" (ne .Values.auth.existingSecret "") }}
{{- end }}
- name: SWITCHYARD_API__KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "switchyard.apiSecret" . }}
      key: {{ include "switchyard.apiSecretKey" . }}
{{- range $var, $ref := include "switchyard.natsCredentials" . | fromJson }}
{{- if ne $var "CREDENTIALS" }}
- name: SWITCHYARD_NATS__{{ $var }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.secret }}
      key: {{ $ref.key }}
{{- end }}
{{- end }}
{{- with include "switchyard.redisPassword" . }}
{{- $ref := fromJson . }}
- name: SWITCHYARD_REDIS__PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $ref.secret }}
      key: {{ $ref.key }}
{{- end }}
{{- end }}

{{/* Volumes shared by the gateway and the feed. */}}
{{- define "switchyard.volumes" -}}
- name: config
  configMap:
    name: {{ include "switchyard.fullname" . }}
{{- $files := include "switchyard.keyFiles" . | fromJson }}
{{- if $files }}
- name: keys
  secret:
    secretName: {{ include "switchyard.authSecret" . }}
    items:
{{- range $key, $file := $files }}
      - key: {{ $file }}
        path: {{ $file }}
{{- end }}
{{- end }}
{{- with (include "switchyard.natsCredentials" . | fromJson).CREDENTIALS }}
- name: nats-credentials
  secret:
    secretName: {{ .secret }}
    items:
      - key: {{ .key }}
        path: credentials
{{- end }}
{{- end }}

{{- define "switchyard.volumeMounts" -}}
- name: config
  mountPath: /etc/switchyard/switchyard.toml
  subPath: switchyard.toml
  readOnly: true
{{- if include "switchyard.keyFiles" . | fromJson }}
- name: keys
  mountPath: /etc/switchyard/keys
  readOnly: true
{{- end }}
{{- if hasKey (include "switchyard.natsCredentials" . | fromJson) "CREDENTIALS" }}
- name: nats-credentials
  mountPath: /etc/switchyard/nats
  readOnly: true
{{- end }}
{{- end }}

# -- naming ---------------------------------------------------------------------------------

variable "name" {
  description = "Name of every resource (load balancer, cluster, roles `<name>-plan`/`<name>-apply`, secrets `<name>/...`)."
  type        = string
  default     = "deploybot"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,22}[a-z0-9]$", var.name))
    error_message = "The name must be 2-24 characters of lower-case letters, digits and dashes (load balancer names are short)."
  }
}

variable "tags" {
  description = "Tags for every resource that takes them."
  type        = map(string)
  default     = {}
}

# -- network --------------------------------------------------------------------------------

variable "vpc_id" {
  description = "The VPC to run in."
  type        = string
}

variable "private_subnet_ids" {
  description = "Private subnets for the task and the database (two or more availability zones). They need a route to the internet (a NAT gateway) for GitHub/GitLab and provider downloads, or VPC endpoints plus a proxy."
  type        = list(string)

  validation {
    condition     = length(var.private_subnet_ids) > 0
    error_message = "Give at least one private subnet."
  }
}

variable "load_balancer_subnet_ids" {
  description = "Subnets of the load balancer: public subnets in two or more availability zones, or private ones with `internal_load_balancer` (e.g. for GitHub Enterprise Server inside your network)."
  type        = list(string)

  validation {
    condition     = length(var.load_balancer_subnet_ids) >= 2
    error_message = "An application load balancer needs subnets in at least two availability zones."
  }
}

variable "internal_load_balancer" {
  description = "Make the load balancer internal (reachable only inside the VPC and connected networks)."
  type        = bool
  default     = false
}

variable "allowed_ingress_cidrs" {
  description = "IPv4 networks that may reach the load balancer on 443, and nothing else may. For GitHub.com, the `hooks` ranges of https://api.github.com/meta (IPv4 ones); add your CI runners' ranges for the trigger API. Slack publishes no ranges: using Slack approvals means allowing 0.0.0.0/0 (every request is still signed and verified)."
  type        = list(string)

  validation {
    condition     = length(var.allowed_ingress_cidrs) > 0 && alltrue([for cidr in var.allowed_ingress_cidrs : can(regex("^[0-9.]+/[0-9]+$", cidr)) && can(cidrnetmask(cidr))])
    error_message = "Give one or more IPv4 CIDR blocks, e.g. \"192.30.252.0/22\" (the load balancer listens on IPv4)."
  }
}

variable "task_egress_cidrs" {
  description = "Where the task may connect on 443: GitHub/GitLab, AWS APIs (STS, the state backend), the Terraform registry and provider downloads. Narrow it if your NAT or proxy allows."
  type        = list(string)
  default     = ["0.0.0.0/0"]

  validation {
    condition     = alltrue([for cidr in var.task_egress_cidrs : can(regex("^[0-9.]+/[0-9]+$", cidr)) && can(cidrnetmask(cidr))])
    error_message = "Give IPv4 CIDR blocks."
  }
}

# -- HTTPS ----------------------------------------------------------------------------------

variable "domain_name" {
  description = "The host name deploybot is reached at, e.g. \"deploybot.example.com\"; the certificate must cover it. Webhook URLs are https://<domain_name>/webhooks/github and /webhooks/gitlab."
  type        = string
}

variable "certificate_arn" {
  description = "ARN of the ACM certificate for `domain_name`, in this region."
  type        = string
}

variable "ssl_policy" {
  description = "The HTTPS listener's TLS policy."
  type        = string
  default     = "ELBSecurityPolicy-TLS13-1-2-2021-06"
}

variable "route53_zone_id" {
  description = "A Route 53 hosted zone to create the `domain_name` alias record in; null to manage DNS yourself (point it at the `load_balancer_dns_name` output)."
  type        = string
  default     = null
}

variable "access_logs_bucket" {
  description = "An S3 bucket for the load balancer's access logs (its policy must let Elastic Load Balancing write); null for none."
  type        = string
  default     = null
}

variable "waf_web_acl_arn" {
  description = "A WAFv2 web ACL (regional) to put in front of the load balancer, e.g. with rate limits; null for none."
  type        = string
  default     = null
}

variable "deletion_protection" {
  description = "Protect the load balancer from deletion."
  type        = bool
  default     = true
}

# -- the container --------------------------------------------------------------------------

variable "container_image" {
  description = "The deploybot image (deploy/Dockerfile, plus your policy file), by digest: \"<account>.dkr.ecr.<region>.amazonaws.com/deploybot@sha256:...\". An ECR image gets pull rights for exactly its repository."
  type        = string
}

variable "container_port" {
  description = "The port deploybot listens on inside the container."
  type        = number
  default     = 8080
}

variable "cpu" {
  description = "Fargate CPU units for the bot's task (1024 = one vCPU); terraform runs in the runners."
  type        = number
  default     = 1024
}

variable "memory" {
  description = "Fargate memory for the task, in MiB."
  type        = number
  default     = 2048
}

variable "policy_file" {
  description = "Path of the policy file inside the image (build it into the image: see README)."
  type        = string
  default     = "/etc/deploybot/policy.yaml"
}

variable "extra_environment" {
  description = "More non-secret config as DEPLOYBOT_<SECTION>__<FIELD> variables, e.g. {DEPLOYBOT_TERRAFORM__PARALLELISM = \"2\"}. Secrets go in `extra_secrets`."
  type        = map(string)
  default     = {}

  validation {
    condition = alltrue([
      for key in keys(var.extra_environment) :
      can(regex("^DEPLOYBOT_[A-Z0-9_]+$", key)) && !can(regex("(SECRET|TOKEN|PASSWORD|PRIVATE_KEY|WEBHOOK_URL)", key))
    ])
    error_message = "Keys must be DEPLOYBOT_* names, and secrets (tokens, keys, webhook secrets and URLs) belong in extra_secrets."
  }
}

variable "extra_secrets" {
  description = "More secrets for the container: environment variable name => Secrets Manager secret ARN, e.g. {DEPLOYBOT_SLACK__BOT_TOKEN = \"arn:aws:secretsmanager:...\"}. The execution role may read exactly these."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for key in keys(var.extra_secrets) : can(regex("^DEPLOYBOT_[A-Z0-9_]+$", key))])
    error_message = "Keys must be DEPLOYBOT_* names."
  }
}

# -- forges and Slack (their secrets are created empty: put the values in, see README) --------

variable "github_app_id" {
  description = "The GitHub App's id (from `deploybot github-app create`); 0 to serve GitLab only."
  type        = number
  default     = 0
}

variable "github_api_url" {
  description = "GitHub's API URL; GitHub Enterprise Server: https://HOST/api/v3."
  type        = string
  default     = "https://api.github.com"
}

variable "github_bot_login" {
  description = "The App's bot user, `<app slug>[bot]`: its own comments are never commands."
  type        = string
  default     = "deploybot[bot]"
}

variable "gitlab_enabled" {
  description = "Serve GitLab: creates the `gitlab-token` and `gitlab-webhook-secret` secrets."
  type        = bool
  default     = false
}

variable "gitlab_url" {
  description = "GitLab's URL (gitlab.com or self-managed)."
  type        = string
  default     = "https://gitlab.com"
}

variable "gitlab_bot_username" {
  description = "The GitLab token's user: its own notes are never commands."
  type        = string
  default     = "deploybot"
}

variable "slack_enabled" {
  description = "Use Slack approvals: creates the `slack-signing-secret` and `slack-webhook-url` secrets."
  type        = bool
  default     = false
}

# -- data, logs, encryption -----------------------------------------------------------------

variable "log_retention_days" {
  description = "How long CloudWatch keeps deploybot's logs."
  type        = number
  default     = 365

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "Use a retention CloudWatch Logs accepts (1, 3, 5, 7, 14, 30, 60, 90, ..., 365, ..., 3653)."
  }
}

variable "kms_key_arn" {
  description = "A customer managed KMS key for the secrets, the database and the log group; null for AWS managed keys. Its key policy must let CloudWatch Logs use it."
  type        = string
  default     = null
}

# -- the roles terraform runs with ----------------------------------------------------------

variable "plan_role_policy_arns" {
  description = "Managed policies of the plan role; null means AWS's ReadOnlyAccess. Plans run code from pull requests (providers, data sources), so give the plan role nothing that writes or reads secrets."
  type        = list(string)
  default     = null
}

variable "plan_role_denied_actions" {
  description = "Actions the plan role is explicitly denied on every resource, whatever its policies allow: by default reading secret values. Remove an action only if your plans must read it (e.g. SSM parameters in data sources)."
  type        = list(string)
  default = [
    "secretsmanager:GetSecretValue",
    "ssm:GetParameter",
    "ssm:GetParameters",
    "ssm:GetParametersByPath",
    "ssm:GetParameterHistory",
  ]
}

variable "state_lock_table_arns" {
  description = "DynamoDB tables that lock your Terraform state (S3 backend): plans take the lock too, so the plan role may read and write lock items there, and nothing else."
  type        = list(string)
  default     = []
}

variable "state_lockfile_arns" {
  description = "S3 object ARNs of Terraform's native state lock files (S3 backend `use_lockfile`), e.g. [\"arn:aws:s3:::my-state/*.tflock\"]: the plan role may create and delete them."
  type        = list(string)
  default     = []
}

variable "apply_role_policy_arns" {
  description = "Managed policies of the apply role: what deploys may change. Grant the services your Terraform manages and no more (least privilege); AdministratorAccess works but makes every approved pull request an administrator. Explicit denies keep the role off deploybot's own roles, secrets and service either way."
  type        = list(string)

  validation {
    condition     = length(var.apply_role_policy_arns) > 0
    error_message = "The apply role needs at least one policy: what your deploys may change."
  }
}

variable "role_permissions_boundary_arn" {
  description = "A permissions boundary for the plan and apply roles; null for none."
  type        = string
  default     = null
}

# -- runners --------------------------------------------------------------------------------

variable "plan_runner_count" {
  description = "Runner tasks of the plan pool waiting for jobs: how many plans run at once."
  type        = number
  default     = 2
}

variable "apply_runner_count" {
  description = "Runner tasks of the apply pool waiting for jobs: how many applies run at once."
  type        = number
  default     = 1
}

variable "runner_cpu" {
  description = "Fargate CPU units of each runner task (1024 = one vCPU); terraform runs there."
  type        = number
  default     = 1024
}

variable "runner_memory" {
  description = "Fargate memory of each runner task, in MiB."
  type        = number
  default     = 2048
}

variable "replicas" {
  description = "How many bot tasks serve at once (each takes any webhook; one dying loses nothing)."
  type        = number
  default     = 2

  validation {
    condition     = var.replicas >= 1
    error_message = "At least one replica must serve."
  }
}

# -- the database -------------------------------------------------------------------------

variable "db_instance_class" {
  description = "RDS instance class of deploybot's PostgreSQL store."
  type        = string
  default     = "db.t4g.micro"
}

variable "db_allocated_storage" {
  description = "GiB of storage for the database (saved plans and webhook bodies live there)."
  type        = number
  default     = 20
}

variable "db_multi_az" {
  description = "A standby database in a second availability zone."
  type        = bool
  default     = false
}

variable "db_backup_retention_days" {
  description = "Days of automated database backups (point-in-time recovery)."
  type        = number
  default     = 7
}

variable "ephemeral_storage_gib" {
  description = "Task storage for git mirrors and working dirs (21-200 GiB); caches, rebuilt after a restart."
  type        = number
  default     = 30
}

